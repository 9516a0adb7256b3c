"""The task suite's comparisons and ``RESULTS_TASKS.md``: paired over each task's held-out items.

Per task: LoRA (16-bit) − base (does tuning teach this task? the suite keeps tasks where it gains
>= 10 points), and per grid every exact method − QLoRA w/ GPTQ, each as the paired difference of
the reported metric with its standard error and McNemar's exact p (:mod:`qalora.eval.paired`),
called only beyond two standard errors.
"""

from __future__ import annotations

from qalora.eval.paired import align, paired, verdict
from qalora.reproduce.tasks import EXACT


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


def _pct(est: dict) -> str:
    if est.get("stderr") is None:
        return f"{100 * est['value']:.1f}"
    return f"{100 * est['value']:.1f} ± {100 * est['stderr']:.1f}"


def tasks_markdown(summary: dict, command: str) -> str:
    """``RESULTS_TASKS.md``: per task a table of held-out accuracy and the paired verdicts."""
    rows, lines = summary["rows"], ["# Task-specific tuning: held-out accuracy, paired comparisons", "",
                                    f"Command: `{command}`", ""]
    m = summary["machine"]
    train = sum(r.get("train_seconds") or 0.0 for r in rows)
    score = sum(r.get("eval_seconds") or 0.0 for r in rows)
    unrecorded = sum(1 for r in rows if r.get("method") and "train_seconds" not in r)
    missing = f" + {unrecorded} tuned rows that did not record it" if unrecorded else ""
    lines += [f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}. Recorded time of the rows: "
              f"training {train / 3600:.2f} h{missing}, held-out scoring {score / 3600:.2f} h (this call "
              f"{summary['seconds_this_call'] / 3600:.2f} h; cached rows are read back, not recomputed).", ""]
    for task in summary["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        grids = sorted({(r["bits"], r["group_size"]) for r in mine if r["bits"]}, reverse=True)
        names = list(dict.fromkeys(r["row"] for r in mine))
        by = {(r["row"], r["bits"], r["group_size"]): r for r in mine}
        metric = mine[0]["reported"]
        lines += [f"## {task} ({metric}, {len(mine[0]['per_item']['index'])} held-out items)", "",
                  "| " + " | ".join(["row", "16-bit", *(f"INT{b} g{g}" for b, g in grids)]) + " |",
                  "|" + "---|" * (len(grids) + 2)]
        for name in names:
            label = next(r["label"] for r in mine if r["row"] == name)
            cells = [_pct(by[(name, None, None)][metric]) if (name, None, None) in by else "-"]
            cells += [_pct(by[(name, b, g)][metric]) if (name, b, g) in by else "-" for b, g in grids]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for c in (c for c in summary["comparisons"] if c["task"] == task):
            where = f"INT{c['bits']} g{c['group_size']}: " if c.get("bits") else ""
            lines.append(f"- {where}{c['a']} {c['verdict']} {c['b']}: {100 * c['diff']:+.1f} ± "
                         f"{100 * (c['stderr'] or 0):.1f} points (paired, n = {c['n']}; {c['a_only']} vs "
                         f"{c['b_only']} discordant, McNemar p = {c['mcnemar_p']:.3g})")
        lines.append("")
    return "\n".join(lines)
