"""Two models scored on the *same* items: the paired difference of their accuracies.

For items ``i = 1..n`` with correctness ``a_i, b_i ∈ {0, 1}`` the per-item difference is
``d_i = a_i − b_i ∈ {−1, 0, 1}``; the accuracy difference is its mean and its standard error is
that of a mean (sample standard deviation over ``sqrt(n)``, as lm-eval's ``mean_stderr``)::

    diff = (1/n) Σ d_i = acc(a) − acc(b)
    se   = sqrt( Σ (d_i − diff)² / (n − 1) / n )

Items both models get right or both get wrong contribute ``d_i = 0``, so the paired standard
error is usually far smaller than the unpaired ``sqrt(se_a² + se_b²)``, which treats the two
accuracies as if measured on independent item sets. Beside it, McNemar's exact test: under "no
difference" the discordant items (``n10`` = a right / b wrong, ``n01`` = the reverse) split as
Binomial(``n10 + n01``, 1/2); the two-sided p-value is ``min(1, 2 · P[X ≤ min(n10, n01)])``.

A comparison is *called* only beyond ``k = 2`` standard errors (:func:`verdict`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Paired:
    """``a − b`` on ``n`` shared items: difference, its paired standard error (``None`` for
    ``n < 2``), discordant counts and McNemar's exact two-sided p-value."""

    diff: float
    stderr: float | None
    n: int
    a_only: int      # items a gets right and b gets wrong (n10)
    b_only: int      # items b gets right and a gets wrong (n01)
    mcnemar_p: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 · P[Binomial(n10 + n01, ½) ≤ min(n10, n01)])``."""
    m, k = n10 + n01, min(n10, n01)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, j) for j in range(k + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def paired(a: Sequence[bool], b: Sequence[bool]) -> Paired:
    """The paired comparison of two correctness vectors over the same items, in the same order.

    Raises:
        ValueError: no items, or vectors of different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} vs {len(b)} results")
    n = len(a)
    if n == 0:
        raise ValueError("paired comparison of zero items")
    d = [int(bool(x)) - int(bool(y)) for x, y in zip(a, b)]
    diff = sum(d) / n
    stderr = math.sqrt(sum((x - diff) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
    n10, n01 = d.count(1), d.count(-1)
    return Paired(diff=diff, stderr=stderr, n=n, a_only=n10, b_only=n01, mcnemar_p=mcnemar_exact(n10, n01))


def align(a: dict, b: dict, metric: str) -> tuple[list[bool], list[bool]]:
    """The two rows' per-item results for ``metric`` on the items both scored, matched by item
    index (``{"index": [...], metric: [...]}`` as :func:`qalora.eval.evaluate.evaluate` saves them).

    Raises:
        ValueError: the rows share no item.
    """
    pos = {i: k for k, i in enumerate(b["index"])}
    pairs = [(a[metric][k], b[metric][pos[i]]) for k, i in enumerate(a["index"]) if i in pos]
    if not pairs:
        raise ValueError("the two rows share no scored item")
    return [x for x, _ in pairs], [y for _, y in pairs]


def verdict(diff: float, stderr: float | None, k: float = 2.0) -> str:
    """``"beat"`` / ``"lost to"`` beyond ``k`` standard errors, else no clear difference."""
    if stderr is None:
        return "showed no clear difference from"
    return "beat" if diff > k * stderr else "lost to" if diff < -k * stderr else "showed no clear difference from"
