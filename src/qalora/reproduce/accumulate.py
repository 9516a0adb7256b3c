"""A suite's report that grows over several calls of ``qalora reproduce --docs``.

A long suite (hours on 2 cores) rarely finishes in one sitting, and each call's work folder may be
gone by the next; so ``--docs`` merges this call's rows into the report already there: a row this
call produced (same row id) replaces the earlier one, the others are kept, and what each call
contributed is listed under ``earlier``. The two reports must be of the same suite, budget and
model, else nothing is merged (one-line error, nothing written).
"""

from __future__ import annotations

from typing import Callable

from qalora.errors import QaloraError

SAME = ("suite", "budget", "source_sha256", "budget_settings")


def _call(summary: dict, ids) -> dict:
    return {"command": summary.get("command"), "grids": summary.get("grids"), "tasks": summary.get("tasks"),
            "rows": sorted(ids),
            "machine": summary.get("machine"), "cached_only": summary.get("cached_only"),
            "seconds_this_call": summary.get("seconds_this_call")}


def accumulate(previous: dict | None, summary: dict, order: Callable[[dict], tuple], what: str) -> dict | None:
    """``summary`` with ``previous``'s other rows, sorted by ``order(row)``, and ``earlier``
    (a list of calls: command, grids, tasks, row ids, machine, seconds); ``None`` when there is nothing
    to merge (no previous report, or none of its rows is kept). ``what`` names the report in the
    error (e.g. ``"methods.json"``)."""
    if not previous:
        return None
    for key in SAME:
        if previous.get(key) != summary.get(key):
            raise QaloraError(f"the earlier {what} has {key} {previous.get(key)!r}, this run "
                              f"{summary.get(key)!r}; write the report into another --docs folder")
    now = {r["id"] for r in summary["rows"]}
    kept = [r for r in previous.get("rows", []) if r["id"] not in now]
    if not kept:
        return None
    earlier = previous.get("earlier") or [_call(previous, [r["id"] for r in previous.get("rows", [])])]
    return {**summary, "rows": sorted(kept + summary["rows"], key=order), "earlier": earlier + [_call(summary, now)]}


def mixed_bases(rows: list[dict], grid_of: Callable[[dict], str | None]) -> dict[str, list[str]]:
    """``{grid: [row ids]}`` for every grid whose rows (those with a grid: ``grid_of(row)`` not
    ``None``) do not all record one and the same ``base_sha256`` (a row without one counts as its
    own): GPTQ is not bit-reproducible across machines, so rows built in different calls may sit
    on different bases, and their figures are then not comparable as they stand."""
    by: dict[str, set] = {}
    for r in rows:
        if (g := grid_of(r)) is not None:
            by.setdefault(g, set()).add(r.get("base_sha256") or f"unrecorded:{r['id']}")
    return {g: sorted(r["id"] for r in rows if grid_of(r) == g) for g, shas in by.items() if len(shas) > 1}
