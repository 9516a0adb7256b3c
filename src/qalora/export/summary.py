"""What the folder exporters (mlx, torchao) report about what they wrote."""

from __future__ import annotations

from pathlib import Path


def error_summary(errors: dict[str, dict]) -> tuple[float, float]:
    """``(max abs error, max error relative to its layer's max |w|)`` over per-layer records
    ``{"max_abs_error", "max_abs_weight"}`` (0 for none)."""
    err = max((e["max_abs_error"] for e in errors.values()), default=0.0)
    rel = max((e["max_abs_error"] / e["max_abs_weight"] for e in errors.values() if e["max_abs_weight"] > 0),
              default=0.0)
    return err, rel


def folder_report(out: Path, source: Path, info: dict, seconds: float) -> dict:
    """The export's report: the folder, its bytes and the qalora weights' bytes, ``info``, time."""
    return {"path": str(out), "folder_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "source_bytes": source.stat().st_size, **info, "seconds": round(seconds, 2)}
