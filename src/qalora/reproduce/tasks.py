"""``qalora reproduce --suite tasks``: task-specific tuning, where tuning teaches something large.

Per task (:mod:`qalora.eval.finetune_tasks`): a deterministic split of its items into a training
part and a disjoint held-out part (:mod:`qalora.reproduce.task_split`); every tuned row trains on
the training part as completion records (the scorer's own strings) for the same steps, rank and
seed, at its own learning rate, chosen on a validation part of the training items
(:mod:`qalora.reproduce.rates`); every row is scored on the held-out part, and keeps each item's
outcome.

Rows per task (``TASK_ROWS``): the untuned base; LoRA (16-bit) and QLoRA (NF4), merged in 16 bits;
and per grid (INT4 g64, INT3 g32, INT2 g32, GPTQ bases) the untuned GPTQ base, QLoRA w/ RTN and
w/ GPTQ (merged, then quantized again: lossy) and every exactly mergeable method (merged exactly, verified). Each
exact method is compared with QLoRA w/ GPTQ at the same grid, paired over the held-out items
(:mod:`qalora.eval.paired`), and called only beyond two standard errors.

Work folder (shared with the other suites): ``tasks/<task>/{split.json, train.jsonl}``,
``adapters/<task>-<row>[-intB-gG]``, ``models/...``, ``rows/tasks-<task>-<row id>.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

from qalora.errors import QaloraError
from qalora.io import read_json, write_json
from qalora.reproduce.grids import grid_name

GRIDS = ((4, 64), (3, 32), (2, 32))


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """``name``; ``method`` trained (``None``: untuned); ``switches`` for ``LoraConfig``;
    ``requant``: re-quantize a 16-bit merge with this method; ``grid``: per grid (else once)."""

    name: str
    method: str | None
    switches: dict = dataclasses.field(default_factory=dict)
    requant: str | None = None
    grid: bool = True
    label: str = ""


TASK_ROWS = (
    TaskRow("base", None, grid=False, label="base (16-bit, untuned)"),
    TaskRow("lora", "lora", grid=False, label="LoRA (16-bit)"),
    TaskRow("qlora", "qlora", grid=False, label="QLoRA (NF4 + 16-bit)"),
    TaskRow("gptq", None, label="GPTQ, untuned (the exact rows' base)"),
    TaskRow("qlora+rtn", "qlora", requant="rtn", label="QLoRA w/ RTN (lossy)"),
    TaskRow("qlora+gptq", "qlora", requant="gptq", label="QLoRA w/ GPTQ (lossy)"),
    TaskRow("qalora", "qalora", label="QA-LoRA"),
    TaskRow("qalora+scales", "qalora", {"train_scales": True}, label="QA-LoRA + scales"),
    TaskRow("peqa", "peqa", label="PEQA (scales)"),
    TaskRow("lota", "lota", label="LoTA-QAF"),
    TaskRow("lota+qalora", "lota", {"with_qalora": True}, label="LoTA-QAF + QA-LoRA"),
)
EXACT = tuple(r.name for r in TASK_ROWS if r.method in ("qalora", "peqa", "lota"))


@dataclasses.dataclass(frozen=True)
class TaskBudget:
    """Steps and sizes of the task suite per ``--budget`` (the paper suite's rank, alpha, seed).
    ``validation``: items carved from the training part to choose each row's rate on;
    ``rates``: the learning rates each row with one tries (:mod:`qalora.reproduce.rates`)."""

    steps: int
    batch_size: int
    max_seq_len: int
    heldout: int
    validation: int
    rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


TASK_BUDGETS = {"small": TaskBudget(steps=200, batch_size=8, max_seq_len=256, heldout=400, validation=150),
                "full": TaskBudget(steps=1000, batch_size=16, max_seq_len=256, heldout=1000, validation=500),
                "smoke": TaskBudget(steps=2, batch_size=4, max_seq_len=256, heldout=8, validation=4,
                                    rates=(1e-3, 1e-2))}


def row_id(task: str, row: TaskRow, grid: tuple[int, int] | None) -> str:
    return f"{task}-{row.name}" + (f"-{grid_name(*grid)}" if grid else "")


def prepare_task(ws, task: str, tb: TaskBudget, limit: int | None = None) -> tuple[Path, tuple, tuple]:
    """``(train.jsonl, held-out items, training items)`` of ``task``, written once under
    ``tasks/<task>/``; ``limit``: use only the first ``limit`` items of the file (smoke runs)."""
    from qalora.eval.finetune_tasks import finetune_items
    from qalora.reproduce.task_split import completion_records, item_key, split_items

    items = finetune_items(task)[:limit]
    split = split_items(items, tb.heldout)
    folder = ws.root / "tasks" / task
    record = {"task": task, "n_items": len(items), "sizes": split.sizes,
              "heldout_keys": sorted({item_key(i) for i in split.heldout})}
    data = folder / "train.jsonl"
    if (folder / "split.json").is_file():
        if read_json(folder / "split.json", "task split") != record:
            raise QaloraError(f"{str(folder)!r} holds another split of {task!r}; use another --out")
        return data, split.heldout, split.train
    folder.mkdir(parents=True, exist_ok=True)
    import json

    tmp = data.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in completion_records(split.train)))
    tmp.replace(data)
    write_json(folder / "split.json", record)
    return data, split.heldout, split.train


def _names(task: str, row: TaskRow, grid, lr, tag: str) -> tuple[str, str]:
    """``(adapter name, merged-model name)``: a 16-bit adapter serves every row of its method
    (QLoRA, w/ RTN, w/ GPTQ), an exact one its own grid; ``tag`` (``"select"``) and the rate
    keep the rate-selection runs and each rate apart."""
    rate = "" if lr is None else f"-lr{lr:g}"
    pre = f"{task}-{tag}-" if tag else f"{task}-"
    grid_part = f"-{grid_name(*grid)}" if grid else ""
    adapter = f"{pre}{row.method}{rate}" if row.method in ("lora", "qlora") else f"{pre}{row.name}{grid_part}{rate}"
    return adapter, f"{pre}{row.name}{grid_part}{rate}"


def build_row_model(ws, task: str, row: TaskRow, grid, data: Path, tb: TaskBudget, lr: float | None = None,
                    tag: str = ""):
    """``(model, tokenizer, facts, inputs, merged folder or None)`` of a row trained on ``data`` at
    ``lr`` (``None``: the method's default), built (or reused) through the workspace."""
    from qalora.adapters.format import adapter_sha256, load_adapted
    from qalora.checkpoint import load
    from qalora.config import QuantConfig
    from qalora.merging.requantize import merge_dense
    from qalora.models import load_fp_model, load_tokenizer

    train = dict(data=str(data), steps=tb.steps, batch_size=tb.batch_size, max_seq_len=tb.max_seq_len)
    if lr is not None:
        train["lr"] = lr
    if row.method is None and grid is not None:  # the grid's GPTQ base, untuned: where the exact rows start
        path = ws.base("gptq", *grid)
        return load(path, kernel="dense"), load_tokenizer(path), {"base_sha256": ws.base_sha256(*grid)}, \
            ws.checkpoint_identity(path), None
    if row.method is None:
        model, tok, _ = load_fp_model(ws.fp_folder)
        return model, tok, {}, {"source_sha256": ws.source_sha256}, None
    adapter_name, model_name = _names(task, row, grid, lr, tag)
    if row.method in ("lora", "qlora"):
        adir, acfg = ws.adapter(row.method, ws.fp_folder, adapter_name, overrides=train)
        if row.requant is None:
            adapted, tok, _ = load_adapted(ws.fp_folder, adir)
            dense, _ = merge_dense(adapted)
            return dense.eval(), tok, {"trainable_parameters": acfg["trainable_parameters"],
                                       "train_seconds": round(acfg["seconds_per_step"] * acfg["steps"], 1)}, \
                {"adapter_sha256": adapter_sha256(acfg)}, None
        requant = QuantConfig(bits=grid[0], group_size=grid[1], method=row.requant, calib_samples=ws.b.calib_samples)
        path, report = ws.merged_model(model_name, adir, acfg, ws.fp_folder, requant)
    else:
        base = ws.base("gptq", *grid)
        adir, acfg = ws.adapter(row.method, base, adapter_name, overrides=train, **row.switches)
        path, report = ws.merged_model(model_name, adir, acfg, base)
    facts = {} if row.requant else {"base_sha256": ws.base_sha256(*grid)}
    facts |= {"trainable_parameters": acfg["trainable_parameters"],
              "train_seconds": round(acfg["seconds_per_step"] * acfg["steps"], 1), "merge_lossy": bool(report.get("lossy")),
              "fp64_max_abs_logit_diff": report.get("fp64_max_abs_logit_diff"),
              "codes_changed_fraction": (report.get("changes") or {}).get("codes_changed_fraction")}
    return load(path, kernel="dense"), load_tokenizer(path), facts, ws.checkpoint_identity(path), path


def task_row(ws, task: str, row: TaskRow, grid, data: Path, heldout, tb: TaskBudget, lr: float | None = None,
             selection: list[dict] | None = None) -> dict:
    """The row's held-out record (cached; reused only when its inputs are this run's), trained at
    ``lr`` (chosen on ``selection``, the validation points, whose ids it records)."""
    from qalora.eval.choice_scoring import score_items
    from qalora.eval.evaluate import per_item
    from qalora.eval.finetune_tasks import reported_metric
    from qalora.eval.stats import accuracy

    rid = row_id(task, row, grid)
    cached = ws.root / "rows" / f"tasks-{rid}.json"
    model, tok, facts, inputs, _ = build_row_model(ws, task, row, grid, data, tb, lr=lr)
    if cached.is_file():
        rec = read_json(cached, "row result")
        ws.check_row(cached, rec, inputs)
        return rec
    t0 = time.time()
    scores = score_items(model, tok, list(heldout), batch_size=ws.b.eval_batch_size, progress=ws.progress,
                         desc=f"{rid} held-out")
    del model
    gc.collect()
    metric = reported_metric(task)
    rec = {"id": rid, "task": task, "row": row.name, "label": row.label, "method": row.method,
           "bits": grid[0] if grid else None, "group_size": grid[1] if grid else None, "inputs": inputs,
           "steps": tb.steps if row.method else 0, "reported": metric, "lr": lr,
           "rate_chosen_on": [p["id"] for p in selection or []], **facts,
           "acc": accuracy([s.acc for s in scores]).to_dict(), "acc_norm": accuracy([s.acc_norm for s in scores]).to_dict(),
           "per_item": per_item(list(heldout), scores, ("acc", "acc_norm")), "eval_seconds": round(time.time() - t0, 1)}
    cached.parent.mkdir(exist_ok=True)
    write_json(cached, rec)
    return rec


def run_tasks(ws, budget: str, tasks, grids=GRIDS, rows=TASK_ROWS, say=print, limit: int | None = None,
              cached_only: bool = False) -> tuple[list[dict], list[dict]]:
    """``(held-out rows, rate-selection points)`` of every row of every task (built, or read
    back); each tuned row first chooses its rate (:mod:`qalora.reproduce.rates`).
    ``cached_only``: the rows and points already computed in the work folder, nothing built (to
    report a run that is still going)."""
    from qalora.reproduce.rates import cached_points, choose_rate, prepare_selection

    if budget not in TASK_BUDGETS:
        raise QaloraError(f"budget {budget!r} has no task settings; use one of: {', '.join(TASK_BUDGETS)}")
    tb = TASK_BUDGETS[budget]
    done, points = [], []
    for task in tasks:
        data, heldout, train_items = prepare_task(ws, task, tb, limit)
        sel = prepare_selection(ws, task, train_items, tb.validation)
        for row in rows:
            if cached_only:
                points += cached_points(ws, task, row, tb)
                done += [read_json(f, "row result") for grid in (grids if row.grid else [None])
                         if (f := ws.root / "rows" / f"tasks-{row_id(task, row, grid)}.json").is_file()]
                continue
            lr, mine = choose_rate(ws, task, row, sel, tb, say=say)
            points += mine
            for grid in (grids if row.grid else [None]):
                say(f"tasks: {row_id(task, row, grid)}" + (f" at lr {lr:g}" if lr is not None else ""))
                done.append(task_row(ws, task, row, grid, data, heldout, tb, lr=lr, selection=mine))
    return done, points
