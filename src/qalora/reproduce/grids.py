"""Names of quantization grids in the reproduction suites: ``(bits, group_size)`` <-> ``"int3-g32"``.

One place for the spelling that row ids, work folders, reports and ``--grids`` share:

    grid_name(3, 32)              -> "int3-g32"
    parse_grid("int3-g32")        -> (3, 32)
    row_grid({"bits": 3, "group_size": 32}) -> "int3-g32"   (None for a 16-bit row)
"""

from __future__ import annotations

import re

from qalora.errors import QaloraError


def grid_name(bits: int, group_size: int) -> str:
    """``"int{bits}-g{group_size}"``."""
    return f"int{bits}-g{group_size}"


def grid_names(grids) -> list[str]:
    """``[grid_name(b, g) for (b, g) in grids]``."""
    return [grid_name(b, g) for b, g in grids]


def row_grid(row: dict) -> str | None:
    """The grid of a result row (its ``bits`` and ``group_size``), ``None`` for a row without bits."""
    return grid_name(row["bits"], row["group_size"]) if row.get("bits") else None


def parse_grid(text: str) -> tuple[int, int]:
    """``"int3-g32"`` -> ``(3, 32)``; anything else is refused in one line."""
    m = re.fullmatch(r"int(\d+)-g(\d+)", text)
    if not m:
        raise QaloraError(f"grid {text!r} is not of the form intB-gG, e.g. int3-g32")
    return int(m.group(1)), int(m.group(2))
