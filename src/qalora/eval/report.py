"""The ``qalora eval`` table, and the results file written atomically without overwriting."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qalora.errors import QaloraError


def _pm(estimate: dict[str, Any] | None) -> str:
    """``"65.50 ± 3.37"`` (percent) for an estimate dict, ``"-"`` without one."""
    if not estimate:
        return "-"
    se = estimate.get("stderr")
    return f"{100 * estimate['value']:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * estimate['value']:.2f}"


def _rows(name: str, res: dict[str, Any]) -> list[tuple[str, ...]]:
    kind, secs = res["kind"], f"{res.get('seconds', 0):.0f} s"
    if kind == "perplexity":
        return [(name, "", str(res["n_tokens"]), "perplexity", f"{res['perplexity']:.3f}", "", secs)]
    if kind == "average":
        return [(name, "avg", str(res["n"]), "score", _pm(res["score"]), f"acc {_pm(res['acc'])}", secs)]
    label = f"{name} ({res['shots']}-shot)" if name == "mmlu" else name
    metric = res["reported"]
    other = [m for m in ("acc", "acc_norm") if m != metric and m in res]
    rows = [(label, res["split"], str(res["n"]), metric, _pm(res[metric]),
             " ".join(f"{m} {_pm(res[m])}" for m in other), secs)]
    if "acc_macro" in res:
        rows.append(("  macro over subjects", "", str(res["acc_macro"]["n"]), "acc", _pm(res["acc_macro"]), "", ""))
        for cat, c in res["categories"].items():
            rows.append((f"  {cat}", "", str(c["acc"]["n"]), "acc", _pm(c["acc"]), f"macro {_pm(c['acc_macro'])}", ""))
    return rows


def format_table(report: dict[str, Any]) -> str:
    """One line per task (MMLU: plus its macro average and categories), values in percent with
    standard errors; the reported metric first, the other one beside it."""
    header = ("task", "split", "n", "metric", "value ± se (%)", "also", "time")
    rows = [header] + [r for name, res in report["results"].items() for r in _rows(name, res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i != 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join(lines)


def write_json_new(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` all at once: a temporary file in the same folder is
    linked to ``path`` (which fails if ``path`` appeared meanwhile) and removed.

    Raises:
        QaloraError: ``path`` already exists.
    """
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise QaloraError(f"output {str(path)!r} already exists; choose a new path or remove it first") from None
        except OSError as e:  # a filesystem without hard links: rename after a last check
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                raise QaloraError(f"output {str(path)!r} already exists; choose a new path or remove it first") from None
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
