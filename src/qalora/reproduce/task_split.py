"""A task's items split in two by a hash of each item: a training part and a disjoint held-out part.

An item's key is the SHA-256 of its contexts (every choice's context, joined), so the split
depends on the text alone — not on file order, ``--limit`` or seeds — and items that share a
context (the same question twice) always land on the same side. Keys are sorted; the held-out
part takes whole key groups in that order until it holds at least ``heldout`` items; the rest
train::

    keys sorted:  k_1 < k_2 < ... < k_m        held-out = items of k_1..k_j, j minimal with >= heldout items
                                               train    = items of k_(j+1)..k_m

The training part becomes completion records ``{"prompt": context, "completion": gold choice}``
of the scorer's own strings (:mod:`qalora.data.readers`): tuning then raises the log-likelihood
of the gold continuation exactly as the held-out part is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from qalora.errors import QaloraError
from qalora.eval.task_spec import ChoiceItem


def item_key(item: ChoiceItem) -> str:
    """SHA-256 (hex) of the item's contexts, joined by U+001F."""
    return hashlib.sha256("\x1f".join(c for c, _ in item.requests).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """The two parts, each in key order (items of one key by source row)."""

    train: tuple[ChoiceItem, ...]
    heldout: tuple[ChoiceItem, ...]

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "heldout": len(self.heldout)}


def split_items(items: Sequence[ChoiceItem], heldout: int) -> TaskSplit:
    """Split ``items`` (module docstring); ``heldout``: at least this many held-out items.

    Raises:
        QaloraError: ``heldout < 1``, or too few items to leave any for training.
    """
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 1:
        raise QaloraError(f"heldout must be an integer >= 1, got {heldout!r}")
    groups: dict[str, list[ChoiceItem]] = {}
    for item in items:
        groups.setdefault(item_key(item), []).append(item)
    held: list[ChoiceItem] = []
    train: list[ChoiceItem] = []
    for key in sorted(groups):
        (held if len(held) < heldout else train).extend(sorted(groups[key], key=lambda i: i.index))
    if not train:
        raise QaloraError(f"{len(items)} items leave none for training after {heldout} held-out ones; "
                          "hold out fewer")
    return TaskSplit(tuple(train), tuple(held))


def completion_records(items: Sequence[ChoiceItem]) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` per item: the context and continuation of its gold choice."""
    return [{"prompt": item.requests[item.gold][0], "completion": item.requests[item.gold][1]} for item in items]
