"""``qalora reproduce``: build every row of :mod:`qalora.reproduce.plan`, evaluate it, keep the
results. Resumable: each finished row is a JSON file under ``out/rows/``, each intermediate
artifact a folder the single commands would have written::

    out/plan.json                  budget + model (a rerun must ask for the same)
    out/bases/{rtn,gptq}-intB-gG/  qalora quantize
    out/adapters/{lora,qlora,qalora-intB-gG}/   qalora train
    out/models/{qlora+rtn,qlora+gptq,qalora}-intB-gG/   qalora merge [--requantize]
    out/rows/<row id>.json         the row's figures (+ held-out instruction loss)
    out/results.json               all rows + machine + timings

Quantized rows are evaluated on the ``dense`` kernel (the reference kernel's fp32 dequantized
weights, cached: bit-identical to ``reference``, without unpacking on every call), so every row
of the table computes in fp32 and differences come from the weights alone.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import torch

from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.io import model_fingerprint, read_json, work_dir, write_json
from qalora.reproduce.grids import grid_name, grid_names
from qalora.reproduce.report import timing
from qalora.stages.identity import normalized, require_same
from qalora.reproduce.plan import (COMMONSENSE, EXTRA_CHOICE, Budget, Row, budget as get_budget, check_paper_rows,
                                   plan_rows)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[qalora reproduce] {msg}", flush=True)


class Workspace:
    """Paths and cached stages of one reproduce run rooted at ``root``."""

    def __init__(self, root: Path, model: str, b: Budget, progress: bool):
        self.root, self.model, self.b, self.progress = root, model, b, progress
        from qalora.default_model import resolve_model

        self.fp_folder = resolve_model(model)
        self.source_sha256 = model_fingerprint(self.fp_folder)
        self._heldout = None

    # --- stages: each reused only when its recorded inputs are this run's (stages.identity) ----
    def base_sha256(self, bits: int, group: int) -> str:
        """The weights SHA-256 of the grid's GPTQ base, which every row built on it records: GPTQ
        is not bit-reproducible across machine types, so rows of different calls may sit on
        different bases (``accumulate.mixed_bases``)."""
        from qalora.checkpoint import read_meta, weights_sha256

        return weights_sha256(read_meta(self.base("gptq", bits, group)))

    def base(self, method: str, bits: int, group: int) -> Path:
        from qalora.api import quantize
        from qalora.checkpoint import read_meta

        path = self.root / "bases" / f"{method}-{grid_name(bits, group)}"
        config = QuantConfig(bits=bits, group_size=group, method=method, calib_samples=self.b.calib_samples)
        if (path / "qalora.json").is_file():
            meta = read_meta(path)
            require_same(path, "quantized base", {"source_sha256": meta.get("source_sha256"),
                                                  "quant_config": normalized(QuantConfig, meta.get("quant_config"))},
                         {"source_sha256": self.source_sha256, "quant_config": config.to_dict()}, hint=HINT)
            return path
        _say(f"quantize {path.name}", self.progress)
        path.parent.mkdir(exist_ok=True)
        quantize(self.fp_folder, path, config, progress=self.progress)
        return path

    def adapter(self, method: str, base: Path, name: str, overrides: dict | None = None,
                **switches) -> tuple[Path, dict]:
        """Train (or reuse) adapter ``name`` of ``method`` on ``base``; ``overrides`` replace the
        budget's ``TrainConfig`` fields (data, steps, batch size, length: the task suite);
        ``switches`` are ``LoraConfig`` options such as ``train_scales`` or ``with_qalora``."""
        from qalora.adapters.base import base_fingerprint
        from qalora.adapters.format import ADAPTER_CONFIG, read_adapter_config
        from qalora.adapters.methods import method_kinds
        from qalora.training.loop import RUN_FILE, train

        b = self.b
        path = self.root / "adapters" / name
        fields = {**dict(steps=b.steps, batch_size=b.batch_size, max_seq_len=b.max_seq_len, lr=b.lr, seed=b.seed),
                  **(overrides or {})}
        cfg = TrainConfig(method=method, eval_every=fields["steps"], save_every=max(1, fields["steps"] // 4), **fields)
        lora = LoraConfig(**{"rank": b.rank, "alpha": b.alpha, **switches})  # a row may set its own rank
        if (path / ADAPTER_CONFIG).is_file():
            done = read_adapter_config(path)
            wanted = {"base_sha256": base_fingerprint(method, base), "train_config": cfg.to_dict(), "rank": lora.rank,
                      "alpha": lora.alpha, "kinds": list(method_kinds(method, lora))}
            if lora.lota_omega is not None:
                wanted["lota_omega"] = lora.lota_omega
            require_same(path, "adapter", {**done, "train_config": normalized(TrainConfig, done.get("train_config"))},
                         wanted, hint=HINT)
            return path, done
        _say(f"train {name} ({method}, {cfg.steps} steps)", self.progress)
        path.parent.mkdir(exist_ok=True)
        train(base, path, cfg, lora, resume=(path / RUN_FILE).is_file(), progress=self.progress)
        return path, read_adapter_config(path)

    def merged_model(self, rid: str, adir: Path, acfg: dict, base: Path,
                     requant: QuantConfig | None = None) -> tuple[Path, dict]:
        """``(checkpoint, merge report)`` of adapter ``adir`` merged exactly into the quantized
        ``base``, or (``requant``) merged in full precision into the model ``base`` and quantized
        again; built once under ``models/rid``."""
        from qalora.adapters.format import adapter_sha256
        from qalora.merging.command import REPORT_FILE, merge
        from qalora.merging.requantize import requantize

        path = self.root / "models" / rid
        wanted = {"adapter_sha256": adapter_sha256(acfg), "base_sha256": acfg["base_sha256"]}
        if requant is not None:
            wanted.update(requantize=requant.method, bits=requant.bits, group_size=requant.group_size)
        if (path / REPORT_FILE).is_file():
            report = read_json(path / REPORT_FILE, "merge report")
            require_same(path, "merged model", report, wanted, hint=HINT)
            return path, report
        path.parent.mkdir(exist_ok=True)
        _say(f"merge {rid}", self.progress)
        if requant is None:
            merge(base, adir, path, progress=self.progress)
        else:
            requantize(base, adir, path, requant, progress=self.progress)
        return path, read_json(path / REPORT_FILE, "merge report")

    def merged(self, row: Row) -> tuple[Path, dict, dict]:
        """``(checkpoint, merge report, adapter config)`` of a qalora / qlora+X row."""
        if row.method == "qalora":
            base = self.base("gptq", row.bits, row.group_size)
            adir, acfg = self.adapter("qalora", base, row.id)
            return (*self.merged_model(row.id, adir, acfg, base), acfg)
        adir, acfg = self.adapter("qlora", self.fp_folder, "qlora")
        requant = QuantConfig(bits=row.bits, group_size=row.group_size, method=row.method.split("+")[1],
                              calib_samples=self.b.calib_samples)
        return (*self.merged_model(row.id, adir, acfg, self.fp_folder, requant), acfg)

    def checkpoint_identity(self, path: Path) -> dict:
        """What a cached row records of the checkpoint it evaluated."""
        from qalora.checkpoint import read_meta, weights_sha256

        return {"checkpoint_sha256": weights_sha256(read_meta(path))}

    def check_row(self, path: Path, rec: dict, inputs: dict) -> None:
        """Refuse a cached row whose recorded inputs are not this run's artifacts'."""
        require_same(path, "row result", rec.get("inputs"), inputs, hint=HINT)

    def row_inputs(self, row: Row) -> dict:
        """The identity of what a paper row evaluates (building missing stages)."""
        if row.method == "base":
            return {"source_sha256": self.source_sha256}
        if row.method in ("lora", "qlora"):
            from qalora.adapters.format import adapter_sha256

            return {"adapter_sha256": adapter_sha256(self.adapter(row.method, self.fp_folder, row.method)[1])}
        if row.method in ("rtn", "gptq"):
            return self.checkpoint_identity(self.base(row.method, row.bits, row.group_size))
        return self.checkpoint_identity(self.merged(row)[0])

    # --- rows ----------------------------------------------------------------------------------
    def build(self, row: Row) -> tuple[torch.nn.Module, object, dict]:
        """``(model, tokenizer, facts)`` of a row, ready to evaluate (eval mode, fp32 compute)."""
        from qalora.adapters.format import load_adapted
        from qalora.checkpoint import load
        from qalora.models import load_fp_model, load_tokenizer
        from qalora.merging.requantize import merge_dense

        if row.method == "base":
            model, tok, _ = load_fp_model(self.fp_folder)
            return model, tok, {"size_bytes": 2 * _n_params(model), "size_note": "16-bit"}
        if row.method in ("lora", "qlora"):
            adir, acfg = self.adapter(row.method, self.fp_folder, row.method)
            adapted, tok, _ = load_adapted(self.fp_folder, adir)
            dense, _ = merge_dense(adapted)
            del adapted
            return dense.eval(), tok, {**_train_facts(acfg), "size_bytes": 2 * _n_params(dense),
                                       "size_note": "16-bit"}
        if row.method in ("rtn", "gptq"):
            path = self.base(row.method, row.bits, row.group_size)
            facts = {}
        else:
            path, report, acfg = self.merged(row)
            facts = {**_train_facts(acfg), **_merge_facts(report)}
        facts["size_bytes"] = (path / "model.safetensors").stat().st_size
        facts["size_note"] = "qalora checkpoint"
        return load(path, kernel="dense"), load_tokenizer(path), facts

    def evaluate(self, model, tok) -> dict:
        from qalora.api import evaluate

        b, p = self.b, self.progress
        common = dict(tokenizer=tok, batch_size=b.eval_batch_size, seed=b.seed, progress=p)
        tasks = list(COMMONSENSE) + list(EXTRA_CHOICE) + ["commonsense"]
        out = evaluate(model, tasks, limit=b.choice_limit, **common)["results"]
        out["mmlu_0shot"] = evaluate(model, ["mmlu"], shots=0, limit=b.mmlu_limit, **common)["results"]["mmlu"]
        out["mmlu_5shot"] = evaluate(model, ["mmlu"], shots=5, limit=b.mmlu5_limit, **common)["results"]["mmlu"]
        out["perplexity"] = evaluate(model, ["perplexity"], windows=b.ppl_windows, **common)["results"]["perplexity"]
        return out

    def heldout_loss(self, model, tok) -> float:
        """Mean response-token cross entropy (fp32) on every held-out example of the training
        data: the objective every tuned row optimised, measured on the final model."""
        from contextlib import nullcontext

        from qalora.training.data import load_train_data
        from qalora.training.loop import validation_loss

        if self._heldout is None:
            b = self.b
            cfg = TrainConfig(batch_size=b.eval_batch_size, max_seq_len=b.max_seq_len, seed=b.seed,
                              eval_batches=1_000_000)
            self._heldout = load_train_data(cfg.data, tok, cfg)
        return validation_loss(model, self._heldout, nullcontext)

    def row(self, row: Row) -> dict:
        """The row's record, computed once and cached; a record from before the held-out loss
        existed gets it added (the row is rebuilt from its cached artifacts)."""
        path = self.root / "rows" / f"{row.id}.json"
        inputs = self.row_inputs(row)
        if path.is_file():
            rec = read_json(path, "row result")
            self.check_row(path, rec, inputs)
            if "heldout_loss" not in rec:
                model, tok, _ = self.build(row)
                _say(f"held-out loss {row.id}", self.progress)
                t0 = time.time()
                rec["heldout_loss"] = self.heldout_loss(model, tok)
                rec["eval_seconds"] = round(rec["eval_seconds"] + time.time() - t0, 1)
                write_json(path, rec)
            return rec
        t0 = time.time()
        model, tok, facts = self.build(row)
        t1 = time.time()
        _say(f"evaluate {row.id}", self.progress)
        results = self.evaluate(model, tok)
        loss = self.heldout_loss(model, tok)
        del model
        gc.collect()
        rec = {"id": row.id, "label": row.label, "method": row.method, "bits": row.bits,
               "group_size": row.group_size, "inputs": inputs, **facts, "results": results, "heldout_loss": loss,
               "build_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
        path.parent.mkdir(exist_ok=True)
        write_json(path, rec)
        return rec


HINT = "delete it (its run recorded other inputs) or use another --out"


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_facts(acfg: dict) -> dict:
    return {"trainable_parameters": acfg["trainable_parameters"], "train_steps": acfg["steps"],
            "train_seconds": round(acfg["seconds_per_step"] * acfg["steps"], 1),
            "val_loss_start": acfg.get("val_loss_start"), "val_loss_end": acfg.get("val_loss_end"),
            "compute": acfg.get("compute")}


def _merge_facts(report: dict) -> dict:
    ref = report.get("reference") or {}
    return {"merge": {"lossy": bool(report.get("lossy")), "fp32_max_abs_logit_diff": ref.get("max_abs_logit_diff"),
                      "fp64_max_abs_logit_diff": report.get("fp64_max_abs_logit_diff"),
                      "top1_agreement": ref.get("top1_agreement")}}


def machine() -> dict:
    """What ran the table."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


SUITES = ("paper", "methods", "tasks")


def reproduce(out: str | os.PathLike = "qalora-reproduce", budget: str = "small", model: str = "default", *,
              rows: list[Row] | None = None, suite: str = "paper", grids: list[tuple[int, int]] | None = None,
              cached_only: bool = False, tasks: list[str] | None = None, task_rows: list[str] | None = None,
              method_rows: list[str] | None = None, paper_rows: list[str] | None = None,
              limit: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) every row of ``suite`` under ``out``; returns and writes
    ``out/results.json`` (paper: :mod:`qalora.reproduce.plan`) or ``out/methods.json``
    (methods: :mod:`qalora.reproduce.methods`; ``grids``: its ``(bits, group_size)`` pairs, default
    all three; ``cached_only``: report the rows already computed, build nothing) or
    ``out/tasks.json`` (tasks: :mod:`qalora.reproduce.tasks`; ``tasks``: which tuning tasks,
    ``task_rows``: which of its rows, ``limit``: first N items of each task, for smoke runs).
    ``paper_rows``: only the paper rows of these methods (e.g. ``["qalora"]``), reported in
    ``out/results-<methods>.json`` (:mod:`qalora.reproduce.rerun` sets them beside a full report).
    The suites can share one ``out``."""
    if suite not in SUITES:
        raise QaloraError(f"suite {suite!r} is unknown; use one of: {', '.join(SUITES)}")
    b = get_budget(budget)
    grids = _check_suite_args(suite, grids, tasks, task_rows, method_rows)  # before anything is written
    check_paper_rows(suite, paper_rows)
    root = work_dir(out)
    ws = Workspace(root, model, b, progress)
    plan = {"budget": b.name, "model": str(model), "source_sha256": ws.source_sha256,
            "budget_settings": {k: v for k, v in vars(b).items()}}
    if (root / "plan.json").is_file():
        recorded = read_json(root / "plan.json", "reproduce plan")
        if {k: recorded.get(k) for k in ("budget", "model", "budget_settings")} != \
                {k: plan[k] for k in ("budget", "model", "budget_settings")}:
            raise QaloraError(f"{str(root)!r} holds a run with budget {recorded.get('budget')!r} on "
                              f"{recorded.get('model')!r}; use another --out for budget {b.name!r} on {model!r}")
        require_same(root / "plan.json", "reproduce plan", recorded, {"source_sha256": ws.source_sha256},
                     hint="use another --out for this model")
    else:
        write_json(root / "plan.json", plan)
    if suite == "methods":
        from qalora.reproduce.methods import GRIDS, METHOD_ROWS, run_methods

        t0 = time.time()
        chosen = [r for r in METHOD_ROWS if method_rows is None or r.name in method_rows]
        done = run_methods(ws, grids, chosen, say=lambda m: _say(m, progress), cached_only=cached_only)
        summary = {**plan, "suite": "methods", "cached_only": cached_only, "grids": grid_names(grids),
                   "method_rows": [r.name for r in chosen], "machine": machine(),
                   "rows": done,
                   "seconds_this_call": round(time.time() - t0, 1)}
        if not cached_only:
            write_json(root / ("methods.json" if grids == list(GRIDS) and method_rows is None else
                               "methods-" + "-".join(grid_name(b, g).replace("-", "") for b, g in grids) + ".json"), summary)
        return summary
    if suite == "tasks":
        return _tasks_suite(ws, plan, b.name, tasks, task_rows, grids, limit, progress, cached_only)
    rows = rows if rows is not None else plan_rows()
    if paper_rows is not None:
        rows = [r for r in rows if r.method in paper_rows]
    t0 = time.time()
    done = []
    for i, row in enumerate(rows, 1):
        _say(f"row {i}/{len(rows)}: {row.label}", progress)
        done.append(ws.row(row))
    summary = {**plan, "machine": machine(), "rows": done,
               "seconds_this_call": round(time.time() - t0, 1),
               "seconds_total": timing(done)["total"]}
    if paper_rows is None:
        write_json(root / "results.json", summary)
    else:
        from qalora.reproduce.rerun import rows_slug

        write_json(root / f"results-{rows_slug(paper_rows)}.json", summary)
    return summary


DEFAULT_TASKS = ("sst2", "arithmetic")


def _check_suite_args(suite: str, grids, tasks, task_rows, method_rows=None) -> list | None:
    """Refuse a grid, task or task row the suite does not have (one line); returns the grids."""
    if suite == "paper":
        return grids
    from qalora.eval.finetune_tasks import FINETUNE_TASKS
    from qalora.reproduce.methods import GRIDS as METHOD_GRIDS
    from qalora.reproduce.tasks import GRIDS as TASK_GRIDS, TASK_ROWS

    allowed = METHOD_GRIDS if suite == "methods" else TASK_GRIDS
    grids = list(grids or allowed)
    bad = [g for g in grids if g not in allowed]
    if bad:
        raise QaloraError(f"grid {grid_name(*bad[0])} is not one of the {suite} suite's: " + ", ".join(grid_names(allowed)))
    unknown = [t for t in tasks or () if t not in FINETUNE_TASKS]
    if unknown:
        raise QaloraError(f"task {unknown[0]!r} is not a tuning task; use: {', '.join(FINETUNE_TASKS)}")
    names = [r.name for r in TASK_ROWS]
    bad_rows = [r for r in task_rows or () if r not in names]
    if bad_rows:
        raise QaloraError(f"task row {bad_rows[0]!r} is unknown; use: {', '.join(names)}")
    from qalora.reproduce.methods import METHOD_ROWS

    mnames = [r.name for r in METHOD_ROWS]
    bad_rows = [r for r in method_rows or () if r not in mnames]
    if bad_rows:
        raise QaloraError(f"method row {bad_rows[0]!r} is unknown; use: {', '.join(mnames)}")
    return grids


def _tasks_suite(ws, plan: dict, budget: str, tasks, task_rows, grids, limit, progress, cached_only=False) -> dict:
    from qalora.reproduce.tasks import TASK_ROWS, run_tasks
    from qalora.reproduce.tasks_report import comparisons

    tasks = list(tasks or DEFAULT_TASKS)
    rows = [r for r in TASK_ROWS if task_rows is None or r.name in task_rows]
    t0 = time.time()
    done, points = run_tasks(ws, budget, tasks, grids, rows, say=lambda m: _say(m, progress), limit=limit,
                             cached_only=cached_only)
    summary = {**plan, "suite": "tasks", "tasks": tasks, "grids": grid_names(grids),
               "machine": machine(), "rows": done, "selection": points, "comparisons": comparisons(done),
               "seconds_this_call": round(time.time() - t0, 1)}
    if not cached_only:
        write_json(ws.root / "tasks.json", summary)
    return summary
