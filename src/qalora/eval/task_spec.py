"""The multiple-choice item type, the task record and how items are sub-sampled.

A multiple-choice item is the list of log-likelihood requests lm-evaluation-harness would send
for it: choice ``i`` is the pair ``(context_i, continuation_i)``; the prediction is
``argmax_i loglik_i`` (``acc``) or ``argmax_i loglik_i / len(choice_i)`` (``acc_norm``, length
in characters of the choice text without the leading space, as lm-eval's ``completion_len``).

``limit`` (per task) keeps ``N`` items: with ``mode="random"`` a seeded random subset, with
``mode="first"`` the first ``N`` in file order (what lm-eval's own ``--limit`` does). Tasks made
of groups (MMLU subjects) spread ``N`` over the groups as evenly as the group sizes allow, in
group order (570 over MMLU's 57 subjects = 10 each), then pick within each group.

The registry of tasks is ``qalora.eval.tasks``; the task modules (``mmlu``, ``multiple_choice``)
import only this file, so nothing imports in a circle.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from qalora.errors import QaloraError

if TYPE_CHECKING:
    import torch

SUBSET_MODES = ("random", "first")


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as scored requests.

    Attributes:
        requests: ``(context, continuation)`` per choice, the strings sent to the model.
        gold: index of the correct choice.
        lengths: characters of each choice's text (the ``acc_norm`` denominator).
        group: sub-set the item belongs to (MMLU subject), ``None`` for ungrouped tasks.
        index: row of the item in its source file.
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...]
    group: str | None = None
    index: int = -1

    def __post_init__(self):
        if len(self.requests) < 2 or len(self.lengths) != len(self.requests):
            raise ValueError(f"an item needs >= 2 requests and one length each, "
                             f"got {len(self.requests)}, {len(self.lengths)}")
        if not 0 <= self.gold < len(self.requests):
            raise ValueError(f"gold {self.gold} is not a choice index of {len(self.requests)} choices")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which items of a task to evaluate: all (``limit=None``) or ``limit`` of them."""

    limit: int | None = None
    seed: int = 0
    mode: str = "random"

    def __post_init__(self):
        bad_limit = isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        if self.limit is not None and bad_limit:
            raise QaloraError(f"limit must be a positive number of items per task, got {self.limit!r}; "
                              f"leave it out for all")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise QaloraError(f"seed must be an integer, got {self.seed!r}")
        if self.mode not in SUBSET_MODES:
            raise QaloraError(f"subset mode {self.mode!r} is unknown; use one of: {', '.join(SUBSET_MODES)}")


@dataclasses.dataclass(frozen=True)
class ChoiceSet:
    """The selected items of a task and how many the full split holds."""

    items: list[ChoiceItem]
    n_available: int


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        kind: ``"perplexity"``, ``"choice"`` (multiple choice, :attr:`load` gives the items) or
            ``"average"`` (over :attr:`members`, each with its :attr:`reported` metric).
        load: ``(shots, selection) -> ChoiceSet`` for ``"choice"`` tasks.
        metrics: metrics computed (``"acc"``, ``"acc_norm"``); :attr:`reported` is the one
            customarily quoted for the task.
        summarize: ``(items, correct) -> dict`` (``correct``: per-item ``acc`` flags) replacing
            the generic summary (MMLU).
        uses_shots: whether ``shots`` applies (MMLU); other tasks are 0-shot.
    """

    name: str
    kind: Literal["perplexity", "choice", "average"]
    summary: str
    split: str = ""
    load: Callable[[int, Selection], ChoiceSet] | None = None
    metrics: tuple[str, ...] = ("acc",)
    reported: str = "acc"
    members: tuple[str, ...] = ()
    summarize: Callable[..., dict] | None = None
    uses_shots: bool = False


def allocate(sizes: Sequence[int], limit: int) -> list[int]:
    """Split ``limit`` items over groups of ``sizes`` as evenly as possible.

    Round-robin in group order, one item at a time, skipping full groups: every group gets
    ``floor(limit / K)`` or one more (earlier groups first) unless it is smaller, and the
    capacity left over goes to the others. The result sums to ``min(limit, sum(sizes))``.
    """
    quota = [0] * len(sizes)
    left = min(limit, sum(sizes))
    while left > 0:
        open_groups = [g for g, n in enumerate(sizes) if quota[g] < n]
        share = max(left // len(open_groups), 1)
        for g in open_groups:
            take = min(share, sizes[g] - quota[g], left)
            quota[g] += take
            left -= take
            if left == 0:
                break
    return quota


def _generator(seed: int, key: str) -> torch.Generator:
    """A torch generator seeded from ``sha256(f"{seed}/{key}")``: one independent stream per
    (seed, task or group), the same on every machine and Python version."""
    import torch  # here, so task names and options import without torch (``qalora --help``)

    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def pick(n: int, k: int, *, seed: int, key: str, mode: str = "random") -> list[int]:
    """Sorted indices of ``k`` of ``range(n)``: the first ``k``, or the first ``k`` entries of
    ``torch.randperm(n)`` drawn with :func:`_generator` (``mode="random"``). ``k >= n``: all."""
    if k >= n:
        return list(range(n))
    if mode == "first":
        return list(range(k))
    import torch

    return sorted(torch.randperm(n, generator=_generator(seed, key))[:k].tolist())


def select(sizes: Sequence[int], keys: Sequence[str], selection: Selection) -> list[list[int]]:
    """Indices kept in each group (``keys`` name the groups; one group for an ungrouped task)."""
    if selection.limit is None:
        return [list(range(n)) for n in sizes]
    quotas = allocate(sizes, selection.limit)
    return [pick(n, q, seed=selection.seed, key=key, mode=selection.mode) for n, q, key in zip(sizes, quotas, keys)]
