"""Each tuned row of the task suite at its own learning rate, chosen on a validation part.

One rate shared by every method is not neutral: QA-LoRA's adapter sees the group mean of its
input and moves about sqrt(L) times slower than LoRA at the same rate, while PEQA's log-scales
move at the rate itself. So every row that trains float parameters picks its rate from a small
log-spaced grid (``TaskBudget.rates``), on items it is never scored on:

    training part (task_split, key order)  =  validation (first key groups, >= n items)
                                            +  selection-train (the rest)
    for lr in rates:  train on selection-train at lr  ->  score on validation
    chosen = argmax validation accuracy (ties: the lower rate)

The held-out part plays no role. A row built per grid chooses at ``SELECT_GRID`` (INT4 g64, on
its GPTQ base) and keeps that rate at every grid; a 16-bit row chooses once. Each re-quantized
QLoRA row (w/ RTN, w/ GPTQ) chooses for itself, scoring its own re-quantized model, since the
rate that tunes best need not be the one whose update survives re-quantization best. LoTA-QAF
alone trains no float parameter (t-SignSGD's quantile schedule replaces a rate; its defaults
are kept, not searched): it has no rate.

A row's final adapter then trains on the whole training part at the chosen rate.

Files (under the suite's work folder): ``tasks/<task>/{select.json, select-train.jsonl}``,
``adapters/<task>-select-<row>-lr<lr>``, ``rows/tasks-<task>-select-<row>[-grid]-lr<lr>.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from pathlib import Path

from qalora.errors import QaloraError
from qalora.io import read_json, write_json
from qalora.reproduce.grids import grid_name

SELECT_GRID = (4, 64)


@dataclasses.dataclass(frozen=True)
class SelectionSplit:
    """The training part cut in two: ``data`` (selection-train, a JSONL file) and ``validation`` items."""

    data: Path
    validation: tuple


def rate_name(lr: float) -> str:
    """``2e-3`` -> ``"lr0.002"`` (the spelling of ids and folder names)."""
    return f"lr{lr:g}"


def has_rate(row) -> bool:
    """Whether the row trains float parameters with AdamW: one of its kinds has a state key that
    t-SignSGD does not train (every tuned row but LoTA-QAF alone), read off the kind registry."""
    if row.method is None:
        return False
    from qalora.adapters.kinds.registry import get_kind
    from qalora.adapters.methods import method_kinds
    from qalora.config import LoraConfig

    kinds = map(get_kind, method_kinds(row.method, LoraConfig(**row.switches)))
    return any(set(k.state_keys) - set(k.ternary) for k in kinds)


def select_grid(row):
    """The grid a row chooses its rate at (``None`` for a 16-bit row)."""
    return SELECT_GRID if row.grid else None


def prepare_selection(ws, task: str, train_items, n: int) -> SelectionSplit:
    """Cut the task's training items into ``n`` (or a few more: whole key groups) validation items
    and the rest, written once under ``tasks/<task>/``."""
    from qalora.reproduce.task_split import completion_records, item_key, split_items

    split = split_items(train_items, n)   # the same key-ordered cut, applied to the training part
    folder = ws.root / "tasks" / task
    record = {"task": task, "sizes": {"selection_train": len(split.train), "validation": len(split.heldout)},
              "validation_keys": sorted({item_key(i) for i in split.heldout})}
    data = folder / "select-train.jsonl"
    if (folder / "select.json").is_file():
        if read_json(folder / "select.json", "selection split") != record:
            raise QaloraError(f"{str(folder)!r} holds another selection split of {task!r}; use another --out")
        return SelectionSplit(data, split.heldout)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in completion_records(split.train)))
    tmp.replace(data)
    write_json(folder / "select.json", record)
    return SelectionSplit(data, split.heldout)


def selection_id(task: str, row, grid, lr: float) -> str:
    return f"{task}-select-{row.name}" + (f"-{grid_name(*grid)}" if grid else "") + f"-{rate_name(lr)}"


def selection_point(ws, task: str, row, lr: float, sel: SelectionSplit, tb) -> dict:
    """Validation accuracy of ``row`` trained on selection-train at ``lr`` (cached; the merged model
    is deleted once scored, the adapter kept)."""
    from qalora.eval.choice_scoring import score_items
    from qalora.eval.finetune_tasks import reported_metric
    from qalora.eval.stats import accuracy
    from qalora.reproduce.tasks import build_row_model

    grid = select_grid(row)
    sid = selection_id(task, row, grid, lr)
    cached = ws.root / "rows" / f"tasks-{sid}.json"
    if cached.is_file():
        return read_json(cached, "rate selection point")
    model, tok, facts, inputs, built = build_row_model(ws, task, row, grid, sel.data, tb, lr=lr, tag="select")
    t0 = time.time()
    scores = score_items(model, tok, list(sel.validation), batch_size=ws.b.eval_batch_size, progress=ws.progress,
                         desc=f"{sid} validation")
    del model
    gc.collect()
    if built is not None:
        shutil.rmtree(built, ignore_errors=True)
    metric = reported_metric(task)
    rec = {"id": sid, "task": task, "row": row.name, "label": row.label, "lr": lr, "split": "validation",
           "bits": grid[0] if grid else None, "group_size": grid[1] if grid else None, "inputs": inputs,
           "reported": metric, "steps": tb.steps, **{k: facts[k] for k in ("train_seconds", "base_sha256") if k in facts},
           "acc": accuracy([s.acc for s in scores]).to_dict(),
           "acc_norm": accuracy([s.acc_norm for s in scores]).to_dict(), "eval_seconds": round(time.time() - t0, 1)}
    cached.parent.mkdir(exist_ok=True)
    write_json(cached, rec)
    return rec


def seed_points(root: Path, points: list[dict]) -> int:
    """Write rate-selection ``points`` of an earlier report (e.g. ``docs/tasks.json``, from a work
    folder since gone) into ``root/rows/`` where that folder has none of the same id, so a later
    call chooses from them instead of training them again; returns how many were written. A point
    keeps the GPTQ base it was measured on (``base_sha256``): the choice is a setting, and the
    held-out rows are built and compared on this call's base."""
    folder = Path(root) / "rows"
    wrote = 0
    for p in points:
        path = folder / f"tasks-{p['id']}.json"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_json(path, p)
            wrote += 1
    return wrote


def cached_points(ws, task: str, row, tb) -> list[dict]:
    """The row's rate-selection points already in the work folder (none for a row without a rate)."""
    if not has_rate(row):
        return []
    paths = [ws.root / "rows" / f"tasks-{selection_id(task, row, select_grid(row), lr)}.json" for lr in tb.rates]
    return [read_json(p, "rate selection point") for p in paths if p.is_file()]


def choose(points: list[dict]) -> float:
    """The rate of the point with the highest validation accuracy of its reported metric; ties go
    to the lower rate."""
    if not points:
        raise QaloraError("no rate was tried; give the budget at least one rate")
    best = max(points, key=lambda p: (p[p["reported"]]["value"], -p["lr"]))
    return best["lr"]


def choose_rate(ws, task: str, row, sel: SelectionSplit, tb, say=print) -> tuple[float | None, list[dict]]:
    """``(chosen rate, the points behind it)``; ``(None, [])`` for a row without a rate."""
    if not has_rate(row):
        return None, []
    points = []
    for lr in tb.rates:
        say(f"tasks: {selection_id(task, row, select_grid(row), lr)}")
        points.append(selection_point(ws, task, row, lr, sel, tb))
    return choose(points), points
