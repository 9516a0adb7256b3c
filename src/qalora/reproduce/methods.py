"""``qalora reproduce --suite methods``: every exactly mergeable method beside QA-LoRA and the
re-quantized QLoRA baseline, on the training objective.

Rows per grid (GPTQ bases at INT4 g64, INT3 g32, INT2 g32; same data, steps, rank, learning rate
and seed for every tuned row)::

    gptq            the quantized base, untuned: the step-0 held-out loss of every method below
    qalora          QA-LoRA offsets
    qalora+scales   QA-LoRA offsets + trained scales (E2E-QP style)
    peqa            trained scales only
    lota            LoTA-QAF ternary code moves + float remainder, t-SignSGD
    lota+qalora     LoTA-QAF + QA-LoRA offsets
    qlora+gptq      QLoRA (NF4 + LoRA) merged in 16 bits, then GPTQ again (lossy)
    lota-omega32    LoTA-QAF with ω = 32 = 0.5 r instead of the paper's 0.75 r: at 100 steps of
                    batch 4 the paper's threshold moves almost no code (``B_T A_T`` rarely passes 48);
                    INT3 g32 only. Lower thresholds diverge at this batch size (ω = 24: training
                    loss 9.5, 9.4, 17.2 at steps 2-4 where ω = 48 has 2.4, 4.8, 6.6; ω = 16: 17.8,
                    14.5, 69.1).
    lota-r8         LoTA-QAF at rank 8 with ω = 4 = 0.5 r (the ratio that trains stably at r = 64):
                    a code moves where 5 of 8 ternary products agree, which 100 steps reach far
                    more often than 49 of 64 (a probe at r = 8, ω = 6: 1.1e-4 of the positions
                    pass ω after 100 steps, 5.8e-3 pass 4; INT3 g32 only).

Every tuned row is merged (exactly, verified; or re-quantized for ``qlora+gptq``) and the
*merged* model's held-out instruction loss is measured (fp32, every held-out example). What the
merge changed (codes moved, scales changed) and its fp64 error are recorded beside it. The
benchmark accuracy of these rows is the accuracy suite's job; this one compares the objective.

Work folder layout as the paper suite's (``bases/``, ``adapters/``, ``models/``, ``rows/``);
rows are cached, so a rerun resumes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

from qalora.io import read_json, write_json
from qalora.reproduce import accumulate
from qalora.reproduce.grids import grid_name, row_grid

GRIDS = ((3, 32), (4, 64), (2, 32))


@dataclass(frozen=True)
class MethodRow:
    """``name``: row name; ``method`` and ``switches``: what ``qalora train`` gets; ``grids``: the
    ``(bits, group)`` grids the row runs on (``None``: every grid)."""

    name: str
    method: str | None
    switches: dict = field(default_factory=dict)
    label: str = ""
    grids: tuple | None = None

    def runs_on(self, bits: int, group: int) -> bool:
        return self.grids is None or (bits, group) in self.grids


METHOD_ROWS = (
    MethodRow("gptq", None, label="GPTQ, no tuning (step 0)"),
    MethodRow("qalora", "qalora", label="QA-LoRA"),
    MethodRow("qalora+scales", "qalora", {"train_scales": True}, label="QA-LoRA + scales"),
    MethodRow("peqa", "peqa", label="PEQA (scales)"),
    MethodRow("lota", "lota", label="LoTA-QAF"),
    MethodRow("lota+qalora", "lota", {"with_qalora": True}, label="LoTA-QAF + QA-LoRA"),
    MethodRow("qlora+gptq", "qlora", label="QLoRA w/ GPTQ (lossy)"),
    MethodRow("lota-omega32", "lota", {"lota_omega": 32.0}, label="LoTA-QAF, ω = 32 (0.5 r)",
              grids=((3, 32),)),
    MethodRow("lota-r8", "lota", {"rank": 8, "lota_omega": 4.0}, label="LoTA-QAF, r = 8, ω = 4 (0.5 r)",
              grids=((3, 32),)),
)


def row_id(row: MethodRow, bits: int, group: int) -> str:
    return f"{row.name}-{grid_name(bits, group)}"


def _merge_row(ws, row: MethodRow, bits: int, group: int):
    """``(merged checkpoint, merge report, adapter config)`` of a tuned row (cached)."""
    from qalora.config import QuantConfig

    rid = row_id(row, bits, group)
    base = ws.base("gptq", bits, group)
    if row.method == "qlora":
        adir, acfg = ws.adapter("qlora", ws.fp_folder, "qlora")
        requant = QuantConfig(bits=bits, group_size=group, method="gptq", calib_samples=ws.b.calib_samples)
        return (*ws.merged_model(rid, adir, acfg, ws.fp_folder, requant), acfg)
    # each method at its own default rate (the paper suite trains at the original code's one
    # rate): its own folders, so a work folder shared by both suites keeps them apart
    adir, acfg = ws.adapter(row.method, base, f"methods-{rid}", overrides={"lr": None}, **row.switches)
    return (*ws.merged_model(f"methods-{rid}", adir, acfg, base), acfg)


def mixed_bases(rows: list[dict]) -> dict[str, list[str]]:
    """``{grid: [row ids]}`` for every grid whose rows do not all record one and the same base
    (a row without ``base_sha256`` counts as its own): their losses are not comparable as they stand."""
    return accumulate.mixed_bases(rows, row_grid)


def method_row(ws, row: MethodRow, bits: int, group: int) -> dict:
    """The row's record (cached under ``rows/``; reused only when it records the checkpoint this
    run's stages hold)."""
    from qalora.checkpoint import load
    from qalora.models import load_tokenizer

    rid = row_id(row, bits, group)
    cached = ws.root / "rows" / f"{rid}.json"
    if row.method is None:
        path, report, acfg = ws.base("gptq", bits, group), None, None
    else:
        path, report, acfg = _merge_row(ws, row, bits, group)
    inputs = ws.checkpoint_identity(path)
    if cached.is_file():
        rec = read_json(cached, "row result")
        ws.check_row(cached, rec, inputs)
        return rec
    t0 = time.time()
    rec = {"id": rid, "row": row.name, "label": row.label, "method": row.method, "switches": row.switches,
           "bits": bits, "group_size": group, "inputs": inputs, "base_sha256": ws.base_sha256(bits, group)}
    if report is not None:
        c = report.get("changes", {})
        rec.update({"kinds": acfg["kinds"], "trainable_parameters": acfg["trainable_parameters"],
                    "adapter_state_bits": acfg.get("adapter_state_bits"), "train_steps": acfg["steps"],
                    "train_seconds": round(acfg["seconds_per_step"] * acfg["steps"], 1),
                    "compute": acfg.get("compute"),
                    "val_loss_start": acfg.get("val_loss_start"), "val_loss_end": acfg.get("val_loss_end"),
                    "merge": {"lossy": bool(report.get("lossy")),
                              "fp64_max_abs_logit_diff": report.get("fp64_max_abs_logit_diff"),
                              "fp64_tolerance": report.get("fp64_tolerance"),
                              "fp32_storage_floor": report.get("fp32_storage_floor"),
                              "fp32_max_abs_logit_diff": (report.get("reference") or {}).get("max_abs_logit_diff"),
                              "max_weight_err_ulps": (report.get("weights") or {}).get("max_weight_err_ulps"),
                              "top1_agreement": (report.get("reference") or {}).get("top1_agreement"),
                              "codes_changed_fraction": c.get("codes_changed_fraction"),
                              "scales_changed_fraction": c.get("scales_changed_fraction"),
                              "max_rel_scale_change": c.get("max_rel_scale_change")}})
    model, tok = load(path, kernel="dense"), load_tokenizer(path)
    rec["heldout_loss"] = ws.heldout_loss(model, tok)
    del model
    gc.collect()
    rec["seconds"] = round(time.time() - t0, 1)
    cached.parent.mkdir(exist_ok=True)
    write_json(cached, rec)
    return rec


def methods_table(rows: list[dict]) -> str:
    """A Markdown table: one line per method, held-out loss per grid (step 0 = the GPTQ base)."""
    grids = [(b, g) for b, g in GRIDS if any(r["bits"] == b and r["group_size"] == g for r in rows)]
    by = {(r["row"], r["bits"], r["group_size"]): r for r in rows}
    head = "| method | " + " | ".join(f"INT{b} g{g}" for b, g in grids) + " | codes moved (INT3 g32) | trainable |"
    lines = [head, "|" + "---|" * (len(grids) + 3)]
    # grids whose rows sit on more than one base: the base of their untuned gptq row (None: unrecorded)
    mixed = mixed_bases(rows)
    apart = {(b, g): (by.get(("gptq", b, g)) or {}).get("base_sha256") for b, g in grids if grid_name(b, g) in mixed}
    marked = False
    for row in METHOD_ROWS:
        cells = []
        for b, g in grids:
            r = by.get((row.name, b, g))
            other = r is not None and (b, g) in apart and r.get("base_sha256") != apart[(b, g)]
            marked = marked or other
            cells.append("-" if r is None else f"{r['heldout_loss']:.3f}" + (" †" if other else ""))
        r3 = by.get((row.name, 3, 32)) or next((r for r in rows if r["row"] == row.name), None)
        moved = "-" if r3 is None or not r3.get("merge") or r3["merge"].get("codes_changed_fraction") is None \
            else f"{100 * r3['merge']['codes_changed_fraction']:.4f} %"
        params = "-" if r3 is None or "trainable_parameters" not in r3 else f"{r3['trainable_parameters'] / 1e6:.2f} M"
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {moved} | {params} |")
    if marked:
        lines.append("\n† on another GPTQ base than the grid's untuned row (GPTQ differs between machines); "
                     "compare it with its own step-0 validation loss in methods.json")
    return "\n".join(lines)


def run_methods(ws, grids=GRIDS, rows=METHOD_ROWS, say=print, cached_only: bool = False) -> list[dict]:
    """Every row of ``grids`` (built, or read from ``rows/``); ``cached_only``: only the rows
    already computed, building nothing (to report a run that is still going)."""
    done = []
    for bits, group in grids:
        for row in rows:
            if not row.runs_on(bits, group):
                continue
            if cached_only and not (ws.root / "rows" / f"{row_id(row, bits, group)}.json").is_file():
                continue
            say(f"methods: {row_id(row, bits, group)}")
            done.append(method_row(ws, row, bits, group))
    return done


def merge_summaries(previous: dict | None, summary: dict) -> dict:
    """``summary`` with the rows of ``previous`` (an earlier ``methods.json``) that this call did
    not produce (by row id: method row and grid), so one report grows row by row and grid by
    grid over several calls (:mod:`qalora.reproduce.accumulate`), with the grids of all its rows
    and ``mixed_bases``."""
    order = {grid_name(b, g): i for i, (b, g) in enumerate(GRIDS)}
    names = [r.name for r in METHOD_ROWS]
    merged = accumulate.accumulate(previous, summary, lambda r: (order.get(row_grid(r), 99),
                                   names.index(r["row"]) if r["row"] in names else 99), "methods.json")
    if merged is None:
        return summary
    grids = sorted({row_grid(r) for r in merged["rows"]}, key=lambda g: order.get(g, 99))
    return {**merged, "grids": grids, "mixed_bases": mixed_bases(merged["rows"])}
