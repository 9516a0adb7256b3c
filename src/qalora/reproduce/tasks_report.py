"""The task suite's comparisons and ``RESULTS_TASKS.md``: paired over each task's held-out items.

Per task: LoRA (16-bit) − base (does tuning teach this task? the suite keeps tasks where it gains
>= 10 points), and per grid every exact method − QLoRA w/ GPTQ, each as the paired difference of
the reported metric with its standard error and McNemar's exact p (:mod:`qalora.eval.paired`),
called only beyond two standard errors. ``merge_task_summaries`` grows one report over several
calls (:mod:`qalora.reproduce.accumulate`).
"""

from __future__ import annotations

from pathlib import Path

from qalora.eval.paired import align, paired, verdict
from qalora.reproduce import accumulate
from qalora.reproduce.grids import grid_names, row_grid
from qalora.reproduce.tasks import EXACT, GRIDS, TASK_ROWS


def _pair(a: dict, b: dict) -> dict:
    metric = a["reported"]
    p = paired(*align(a["per_item"], b["per_item"], metric))
    return {**p.to_dict(), "metric": metric, "a": a["id"], "b": b["id"], "verdict": verdict(p.diff, p.stderr)}


def comparisons(rows: list[dict]) -> list[dict]:
    """Every comparison the rows allow (module docstring)."""
    by = {(r["task"], r["row"], r["bits"], r["group_size"]): r for r in rows}
    out = []
    for (task, name, bits, group), r in by.items():
        if name == "lora" and (base := by.get((task, "base", None, None))):
            out.append({"task": task, "kind": "tuning gain", **_pair(r, base)})
        if name in EXACT and (ref := by.get((task, "qlora+gptq", bits, group))):
            out.append({"task": task, "kind": "exact vs requantized", "bits": bits, "group_size": group,
                        **_pair(r, ref)})
    return out


def _exact_task_grid(r: dict) -> str | None:
    """``"<task> <grid>"`` of a row built on the grid's GPTQ base (the untuned base, exact methods),
    else ``None``. Per task, as comparisons are: rows of two tasks on two bases compare nothing
    across them (each task's exact rows pair with its own QLoRA w/ GPTQ)."""
    return f"{r['task']} {row_grid(r)}" if r["row"] in EXACT or r["row"] == "gptq" else None


def merge_task_summaries(previous: dict | None, summary: dict) -> dict:
    """``summary`` with the rows of ``previous`` (an earlier ``tasks.json``) that this call did
    not produce, ordered by task (earlier tasks first), row and grid; its tasks, grids and
    comparisons are those of all the rows, and ``mixed_bases`` lists the (task, grid)s whose exact rows
    sit on different GPTQ bases."""
    tasks = list(dict.fromkeys([*(previous or {}).get("tasks", []), *summary["tasks"]]))
    names = [r.name for r in TASK_ROWS]
    grids = grid_names(GRIDS)

    def order(r):
        grid = row_grid(r)
        return (tasks.index(r["task"]) if r["task"] in tasks else 99, names.index(r["row"]) if r["row"] in names else 99,
                -1 if grid is None else grids.index(grid) if grid in grids else 99)

    mine = {p["id"] for p in summary.get("selection", [])}
    points = [p for p in (previous or {}).get("selection", []) if p["id"] not in mine] + summary.get("selection", [])
    summary = {**summary, "selection": sorted(points, key=lambda p: (p["task"], p["row"], p["lr"]))}
    merged = accumulate.accumulate(previous, summary, order, "tasks.json")
    if merged is None:
        return summary
    rows = merged["rows"]
    have = {row_grid(r) for r in rows if r.get("bits")}
    return {**merged, "tasks": [t for t in tasks if any(r["task"] == t for r in rows)],
            "grids": [g for g in grids if g in have], "comparisons": comparisons(rows),
            "mixed_bases": accumulate.mixed_bases(rows, _exact_task_grid)}


def training_seconds(rows: list[dict]) -> float:
    """Seconds of training behind ``rows``, each adapter counted once: the 16-bit QLoRA adapter
    serves the QLoRA row and every re-quantized row of its task (one ``train_seconds`` copied
    into each); an exact row's adapter is its own (one per task and grid)."""
    seen: dict[tuple, float] = {}
    for r in rows:
        if r.get("train_seconds") is not None:
            grid = (r["bits"], r["group_size"]) if r["row"] in EXACT else None
            seen.setdefault((r["task"], r["method"], grid, r["row"] if grid else None), r["train_seconds"])
    return sum(seen.values())


def selection_seconds(points: list[dict]) -> float:
    """Seconds of training behind the rate-selection ``points``, each adapter counted once (the
    QLoRA rows' points at one rate share one adapter)."""
    method = {r.name: r.method for r in TASK_ROWS}
    seen: dict[tuple, float] = {}
    for p in points:
        if p.get("train_seconds") is not None:
            m = method.get(p["row"], p["row"])
            key = (p["task"], m, p["lr"], None if m in ("lora", "qlora") else p["row"])
            seen.setdefault(key, p["train_seconds"])
    return sum(seen.values())


def _pct(est: dict) -> str:
    if est.get("stderr") is None:
        return f"{100 * est['value']:.1f}"
    return f"{100 * est['value']:.1f} ± {100 * est['stderr']:.1f}"


PLOT_FILE = "results_tasks.png"
# A task is kept when 16-bit LoRA gains at least this much over the untuned base (a fraction of items).
MIN_TUNING_GAIN = 0.10


def task_choice_lines(summary: dict) -> list[str]:
    """``## Task choice``: per task with a base and a LoRA row, LoRA's paired gain and whether it
    clears :data:`MIN_TUNING_GAIN` (kept) or not (dropped: no method could show that it keeps a
    gain); then the suite's other tasks, not measured in these rows."""
    from qalora.eval.finetune_tasks import FINETUNE_TASKS

    gains = {c["task"]: c for c in summary["comparisons"] if c["kind"] == "tuning gain"}
    if not gains:
        return []
    lines = ["## Task choice", "",
             f"A task stays in the suite when 16-bit LoRA gains at least {100 * MIN_TUNING_GAIN:.0f} points over the "
             "untuned base on its held-out items (else tuning teaches too little for any method to show it keeps it).",
             "", "| task | LoRA − base (paired) | kept |", "|---|---|---|"]
    for task, c in gains.items():
        kept = c["diff"] >= MIN_TUNING_GAIN and c["verdict"] == "beat"
        lines.append(f"| {task} | {100 * c['diff']:+.1f} ± {100 * (c['stderr'] or 0):.1f} | "
                     f"{'kept' if kept else 'dropped'} |")
    untried = [t for t in FINETUNE_TASKS if t not in gains]
    if untried:
        lines += ["", f"Not measured in these rows: {', '.join(untried)}."]
    return lines + [""]


def verdict_lines(summary: dict, task: str) -> list[str]:
    """One plain sentence per grid of ``task``: how QA-LoRA and each other exact method fared
    against QLoRA w/ GPTQ (beat / lost / no clear difference, i.e. within two paired SEs)."""
    labels = {r["id"]: r["label"] for r in summary["rows"]}
    by: dict[tuple, dict[str, list[str]]] = {}
    for c in summary["comparisons"]:
        if c["task"] == task and c["kind"] == "exact vs requantized":
            by.setdefault((c["bits"], c["group_size"]), {}).setdefault(c["verdict"], []).append(labels[c["a"]])
    lines = []
    for (bits, group), verdicts in sorted(by.items(), reverse=True):
        parts = [f"{', '.join(names)}: {word}" for word, names in
                 (("beat it", verdicts.get("beat", [])), ("lost to it", verdicts.get("lost to", [])),
                  ("no clear difference", verdicts.get("showed no clear difference from", []))) if names]
        lines.append(f"- **INT{bits} g{group}**, against QLoRA w/ GPTQ — " + "; ".join(parts) + ".")
    return ["Verdicts:", "", *lines, ""] if lines else []


def _rate(r: dict) -> str:
    if not r.get("method"):
        return "-"
    return f"{r['lr']:g}" if r.get("lr") is not None else ("t-SignSGD" if r["method"] == "lota" else "?")


def selection_lines(summary: dict, task: str) -> list[str]:
    """The rate-selection table of ``task``: validation accuracy (%) per row and rate, the chosen
    (highest; ties to the lower rate) in bold once every rate is in; rows without a rate are not
    listed."""
    points = [p for p in summary.get("selection", []) if p["task"] == task]
    if not points:
        return []
    rates = sorted({p["lr"] for p in points})
    by = {(p["row"], p["lr"]): p for p in points}
    first = points[0]
    n = first[first["reported"]]["n"]
    lines = [f"Rate selection ({first['reported']} on {n} validation items carved from the training part; "
             "rows built per grid chose at INT4 g64):", "",
             "| row | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for name in dict.fromkeys(p["row"] for p in points):
        mine = [by[(name, lr)] for lr in rates if (name, lr) in by]
        done = len(mine) == len(rates)      # a row still choosing gets no bold: nothing is chosen yet
        best = max(mine, key=lambda p: (p[p["reported"]]["value"], -p["lr"])) if done else None
        cells = []
        for lr in rates:
            p = by.get((name, lr))
            v = "-" if p is None else f"{100 * p[p['reported']]['value']:.1f}"
            cells.append(f"**{v}**" if p is not None and p is best else v)
        lines.append(f"| {mine[0]['label']}{'' if done else ' (still choosing)'} | " + " | ".join(cells) + " |")
    return lines + [""]


def tasks_markdown(summary: dict, command: str, plot: str | None = None) -> str:
    """``RESULTS_TASKS.md``: per task a table of held-out accuracy and the paired verdicts;
    ``plot``: the file name of the plot beside it (:mod:`qalora.reproduce.tasks_plot`), shown first."""
    calls = summary.get("earlier") or []
    which = " of the last call" if calls else ""
    rows, lines = summary["rows"], ["# Task-specific tuning: held-out accuracy, paired comparisons", "",
                                    f"Command{which}: `{command}`", ""]
    m = summary["machine"]
    train = training_seconds(rows)
    score = sum(r.get("eval_seconds") or 0.0 for r in rows)
    unrecorded = sum(1 for r in rows if r.get("method") and "train_seconds" not in r)
    missing = f" + {unrecorded} tuned rows that did not record it" if unrecorded else ""
    points = summary.get("selection", [])
    chose = (f"; choosing the rates: {len(points)} validation runs, training "
             f"{selection_seconds(points) / 3600:.2f} h, scoring "
             f"{sum(p.get('eval_seconds') or 0.0 for p in points) / 3600:.2f} h" if points else "")
    lines += [f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}. Recorded time of the rows: "
              f"training {train / 3600:.2f} h{missing}, held-out scoring {score / 3600:.2f} h{chose} (this call "
              f"{summary['seconds_this_call'] / 3600:.2f} h; cached rows are read back, not recomputed).", ""]
    if plot:
        lines += [f"![held-out accuracy vs bits per method]({plot})", ""]
    if summary.get("earlier"):
        lines += [f"The rows come from {len(summary['earlier'])} calls (listed under `earlier` in the JSON, with the command of each call that recorded it).", ""]
    for grid, ids in (summary.get("mixed_bases") or {}).items():
        lines += [f"{grid}: the exact rows sit on more than one GPTQ base (GPTQ is not bit-reproducible across "
                  f"machines): {', '.join(ids)}; each still pairs with QLoRA w/ GPTQ, which does not use the base.", ""]
    lines += task_choice_lines(summary)
    for task in summary["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        grids = sorted({(r["bits"], r["group_size"]) for r in mine if r["bits"]}, reverse=True)
        names = list(dict.fromkeys(r["row"] for r in mine))
        by = {(r["row"], r["bits"], r["group_size"]): r for r in mine}
        metric = mine[0]["reported"]
        lines += [f"## {task} ({metric}, {len(mine[0]['per_item']['index'])} held-out items)", "",
                  "| " + " | ".join(["row", "lr", "16-bit", *(f"INT{b} g{g}" for b, g in grids)]) + " |",
                  "|" + "---|" * (len(grids) + 3)]
        for name in names:
            label = next(r["label"] for r in mine if r["row"] == name)
            rates = sorted({_rate(r) for r in mine if r["row"] == name})
            cells = [" / ".join(rates)]
            cells += [_pct(by[(name, None, None)][metric]) if (name, None, None) in by else "-"]
            cells += [_pct(by[(name, b, g)][metric]) if (name, b, g) in by else "-" for b, g in grids]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += selection_lines(summary, task)
        bases = {f"INT{r['bits']} g{r['group_size']}": r["base_sha256"][:12] for r in mine if r.get("base_sha256")}
        if bases:
            lines += ["The exact rows' GPTQ base (SHA-256 of its checkpoint): "
                      + ", ".join(f"{g} `{sha}…`" for g, sha in bases.items()) + ".", ""]
        lines += verdict_lines(summary, task)
        for c in (c for c in summary["comparisons"] if c["task"] == task):
            where = f"INT{c['bits']} g{c['group_size']}: " if c.get("bits") else ""
            lines.append(f"- {where}{c['a']} {c['verdict']} {c['b']}: {100 * c['diff']:+.1f} ± "
                         f"{100 * (c['stderr'] or 0):.1f} points (paired, n = {c['n']}; {c['a_only']} vs "
                         f"{c['b_only']} discordant, McNemar p = {c['mcnemar_p']:.3g})")
        lines.append("")
    return "\n".join(lines)


def write_task_docs(summary: dict, folder, command: str) -> list[Path]:
    """``tasks.json``, the plot and ``RESULTS_TASKS.md`` into ``folder``, each written atomically."""
    from qalora.io import write_json, write_text
    from qalora.reproduce.tasks_plot import plot_tasks

    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    paths = [folder / "tasks.json", folder / PLOT_FILE, folder / "RESULTS_TASKS.md"]
    write_json(paths[0], summary)
    plot_tasks(summary, paths[1])
    write_text(paths[2], tasks_markdown(summary, command, plot=PLOT_FILE) + "\n")
    return paths
