"""Accuracies with standard errors, and averages of them.

For ``n`` items scored 0/1 with mean ``p`` the standard error is that of lm-evaluation-harness
(``mean_stderr``: sample standard deviation over ``sqrt(n)``)::

    se(p) = sqrt( sum_i (x_i - p)^2 / (n - 1) / n ) = sqrt( p (1 - p) / (n - 1) )

An average of independent estimates ``p_1..p_K`` with weights ``w_k`` (normalised,
``sum_k w_k = 1``) has::

    p = sum_k w_k p_k          se(p) = sqrt( sum_k w_k^2 se(p_k)^2 )

``w_k = 1/K`` gives the macro average (e.g. over MMLU subjects, or over tasks);
``w_k = n_k / N`` gives the item-weighted average, whose standard error is that of a stratified
sample (it equals lm-eval's pooled-variance figure up to ``O(K/N)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` items with its standard error (``None`` where undefined, ``n < 2``)."""

    value: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def binomial_stderr(p: float, n: int) -> float | None:
    """``sqrt(p (1 - p) / (n - 1))``; ``None`` for ``n < 2``."""
    if n < 2:
        return None
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def accuracy(correct: Sequence[bool]) -> Estimate:
    """Fraction of true entries, with :func:`binomial_stderr`.

    Raises:
        ValueError: no items.
    """
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of zero items")
    p = sum(bool(c) for c in correct) / n
    return Estimate(value=p, stderr=binomial_stderr(p, n), n=n)


def average(estimates: Sequence[Estimate], weights: Sequence[float] | None = None) -> Estimate:
    """Weighted mean of independent estimates (module docstring); equal weights by default.

    ``n`` of the result is the total number of items. The standard error is ``None`` when any
    part's is.

    Raises:
        ValueError: no estimates, weights of another length, or weights not summing to > 0.
    """
    if not estimates:
        raise ValueError("average of zero estimates")
    if weights is None:
        weights = [1.0] * len(estimates)
    if len(weights) != len(estimates) or sum(weights) <= 0:
        raise ValueError(f"need one positive-sum weight per estimate, got {list(weights)} for {len(estimates)}")
    total = float(sum(weights))
    w = [x / total for x in weights]
    value = sum(wk * e.value for wk, e in zip(w, estimates))
    if any(e.stderr is None for e in estimates):
        stderr = None
    else:
        stderr = math.sqrt(sum((wk * e.stderr) ** 2 for wk, e in zip(w, estimates)))  # type: ignore[operator]
    return Estimate(value=value, stderr=stderr, n=sum(e.n for e in estimates))


def item_weighted(estimates: Sequence[Estimate]) -> Estimate:
    """:func:`average` with ``w_k = n_k`` (every item counts once)."""
    return average(estimates, [e.n for e in estimates])
