"""Some rows of the paper suite built again, set beside the rows of the report they re-do.

``qalora reproduce --suite paper --paper-rows qalora --docs docs`` rebuilds only the chosen rows
(e.g. after a change to how they train) and writes ``docs/results-rerun-<rows>.json``: the new
rows, and for each the row of the same id in ``docs/results.json`` (``before``), compared on
the metrics the table reports::

    step-0 validation loss   the row's base before tuning, each on its own compute path: a
                             change beyond the path's own (bf16 vs fp32: ~1e-3 at INT3) says the
                             base changed (GPTQ differs between machines and thread counts)
    held-out loss, ppl       after − before (single runs: no standard error)
    commonsense average,     after − before ± se, paired over the shared items when both rows
    MMLU 0-shot / 5-shot     kept per-item results (report.paired_compare), else unpaired
                             (sqrt(se_a² + se_b²)); called beyond two standard errors

``docs/results.json`` itself is left as it stands: its other rows (the baselines, the GPTQ bases)
come from the run that built them, so the re-run rows are reported beside them, not in the table.
"""

from __future__ import annotations

from pathlib import Path

from qalora.errors import QaloraError
from qalora.reproduce.report import _pct, difference, score

METRICS = (("commonsense", "CS avg (7)"), ("mmlu_0shot", "MMLU 0-shot"), ("mmlu_5shot", "MMLU 5-shot"))


def rows_slug(names: list[str]) -> str:
    """Paper row methods ``names`` (e.g. ``["qalora", "qlora+gptq"]``) as a file-name part."""
    return "-".join(n.replace("+", "_") for n in names)


def rerun_file(names: list[str]) -> str:
    """The report's file name for re-run rows ``names`` (paper row methods, e.g. ``["qalora"]``)."""
    return f"results-rerun-{rows_slug(names)}.json"


def read_paper_report(docs: str | Path, budget: str) -> dict | None:
    """``docs/results.json`` (the full paper report re-run rows are set beside), if there is one;
    refused in one line when it is unreadable or of another budget."""
    from qalora.io import read_json

    path = Path(docs) / "results.json"
    if not path.is_file():
        return None
    previous = read_json(path, "paper report")
    if previous.get("budget") != budget:
        raise QaloraError(f"{str(path)!r} reports budget {previous.get('budget')!r}; re-run its rows at that budget "
                          f"or write into another --docs folder")
    return previous


def _accuracy(after: dict, before: dict, key: str) -> dict:
    diff, se, word, n = difference(after, before, key)
    return {"diff": diff, "stderr": se, "verdict": word, "paired": n is not None, **({} if n is None else {"n": n})}


def _change(after: float | None, before: float | None) -> dict | None:
    return None if after is None or before is None else {"before": before, "after": after, "diff": after - before}


def _ppl(row: dict) -> float | None:
    p = (row.get("results") or {}).get("perplexity")
    return p.get("perplexity") if isinstance(p, dict) else None


def changes(rows: list[dict], previous: dict | None) -> list[dict]:
    """One record per new row: its id, the compute path it trained on (``compute`` of its
    adapter, ``None`` for the rows built before it was recorded) and, when ``previous`` has a
    row of that id, the change on every metric (module docstring)."""
    before = {r["id"]: r for r in (previous or {}).get("rows", [])}
    out = []
    for r in rows:
        rec = {"id": r["id"], "label": r["label"], "compute": r.get("compute")}
        old = before.get(r["id"])
        if old is not None:
            rec["compute_before"] = old.get("compute")
            rec["val_loss_start"] = _change(r.get("val_loss_start"), old.get("val_loss_start"))
            rec["heldout_loss"] = _change(r.get("heldout_loss"), old.get("heldout_loss"))
            rec["ppl"] = _change(_ppl(r), _ppl(old))
            rec["accuracy"] = {key: _accuracy(r, old, key) for key, _ in METRICS}
        out.append(rec)
    return out


def _path(c: dict | None) -> str:
    if not c:
        return "not recorded"
    return f"{c.get('dtype')} / {c.get('base_kernel')}"


def rerun_markdown(report: dict) -> str:
    """A table (one line per re-run row: held-out loss, perplexity, each accuracy before → after
    with the difference) and a line on how each difference was computed."""
    rows = {r["id"]: r for r in report["rows"]}
    before = {r["id"]: r for r in report.get("before", [])}
    head = ["row", "compute (before → after)", "step-0 val loss", "held-out loss", "ppl", *(name for _, name in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    paired_any = unpaired_any = False
    for ch in report["changes"]:
        r, old = rows[ch["id"]], before.get(ch["id"])
        if old is None:
            lines.append(f"| {ch['label']} | {_path(ch['compute'])} | - | {r['heldout_loss']:.3f} (new) | - |"
                         + " - |" * len(METRICS))
            continue
        v0, hl, pp = ch.get("val_loss_start"), ch["heldout_loss"], ch["ppl"]
        cells = [ch["label"], f"{_path(ch.get('compute_before'))} → {_path(ch['compute'])}",
                 "-" if v0 is None else f"{v0['before']:.4f} → {v0['after']:.4f}",
                 "-" if hl is None else f"{hl['before']:.3f} → {hl['after']:.3f} ({hl['diff']:+.3f})",
                 "-" if pp is None else f"{pp['before']:.1f} → {pp['after']:.1f}"]
        for key, _ in METRICS:
            a = ch["accuracy"][key]
            paired_any |= a["paired"]
            unpaired_any |= not a["paired"]
            word = {"beat": "higher", "lost to": "lower"}.get(a["verdict"], "n.s.")
            cells.append(f"{_pct(score(old, key))} → {_pct(score(r, key))} "
                         f"({100 * a['diff']:+.1f} ± {100 * a['stderr']:.1f}, {word})")
        lines.append("| " + " | ".join(cells) + " |")
    how = []
    if paired_any:
        how.append("paired over the shared items where both rows kept per-item results")
    if unpaired_any:
        how.append("unpaired (sqrt(se_a² + se_b²)) where the earlier row kept none")
    lines += ["", "Accuracy differences (after − before, points ± standard error; higher / lower beyond two "
                  "standard errors, n.s. within them): " + "; ".join(how) + "."]
    return "\n".join(lines)


def rerun_report(summary: dict, previous: dict | None, command: str, names: list[str]) -> dict:
    """The JSON behind ``results-rerun-*.json``: this call's summary, the rows it re-does as the
    earlier report holds them (``before``), and :func:`changes`."""
    ids = {r["id"] for r in summary["rows"]}
    return {**summary, "command": command, "paper_rows": list(names),
            "before": [r for r in (previous or {}).get("rows", []) if r["id"] in ids],
            "before_machine": (previous or {}).get("machine"),
            "changes": changes(summary["rows"], previous)}
