"""Multiple-choice items scored: log-likelihood per choice, then ``acc`` and ``acc_norm``.

For an item with choice log-likelihoods ``l_i`` (summed over the continuation's tokens, nats)
and choice lengths ``n_i`` in characters::

    pred      = argmax_i l_i            acc      = [pred == gold]
    pred_norm = argmax_i l_i / n_i      acc_norm = [pred_norm == gold]

ties go to the lowest index (numpy's ``argmax``, as lm-eval). Items whose choices share their
context run through :func:`qalora.eval.shared_prefix.score_shared_context` (context once per
item); the others (WinoGrande: one context per choice), and any item too long for
``max_length``, through :func:`qalora.eval.scoring.score_tokens`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from qalora.eval.scoring import Scored, encode_pair, score_tokens
from qalora.eval.shared_prefix import score_shared_context
from qalora.eval.task_spec import ChoiceItem


@dataclasses.dataclass(frozen=True)
class ItemScore:
    """One item's outcome: per-choice log-likelihoods, the two predictions and the gold index."""

    logliks: tuple[float, ...]
    pred: int
    pred_norm: int
    gold: int

    @property
    def acc(self) -> bool:
        return self.pred == self.gold

    @property
    def acc_norm(self) -> bool:
        return self.pred_norm == self.gold


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predict(logliks: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """``(argmax_i l_i, argmax_i l_i / n_i)``; a zero length counts as 1 character."""
    return argmax_first(logliks), argmax_first([ll / max(n, 1) for ll, n in zip(logliks, lengths)])


def item_score(item: ChoiceItem, scored: Sequence[Scored]) -> ItemScore:
    logliks = tuple(s.loglik for s in scored)
    pred, pred_norm = predict(logliks, item.lengths)
    return ItemScore(logliks=logliks, pred=pred, pred_norm=pred_norm, gold=item.gold)


def _max_length(model: torch.nn.Module, max_length: int) -> int:
    """``max_length``, lowered to the model's ``max_position_embeddings`` when it has one."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length


def score_items(model: torch.nn.Module, tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 4,
                max_length: int = 2048, progress: bool = False, desc: str = "scoring") -> list[ItemScore]:
    """:class:`ItemScore` of each item, in input order (routing in the module docstring)."""
    max_length = _max_length(model, max_length)
    encoded = [[encode_pair(tokenizer, c, y) for c, y in item.requests] for item in items]
    shared, separate = [], []
    for k, pairs in enumerate(encoded):
        same = all(ctx == pairs[0][0] for ctx, _ in pairs)
        fits = len(pairs[0][0]) + max(len(y) for _, y in pairs) - 1 <= max_length
        (shared if same and fits else separate).append(k)
    scored: list[Sequence[Scored] | None] = [None] * len(items)
    if shared:
        groups = [(encoded[k][0][0], [y for _, y in encoded[k]]) for k in shared]
        for k, res in zip(shared, score_shared_context(model, groups, progress=progress, desc=desc)):
            scored[k] = res
    if separate:
        flat = [pair for k in separate for pair in encoded[k]]
        res = score_tokens(model, flat, batch_size=batch_size, max_length=max_length, progress=progress, desc=desc)
        start = 0
        for k in separate:
            scored[k] = res[start:start + len(encoded[k])]
            start += len(encoded[k])
    return [item_score(item, s) for item, s in zip(items, scored)]  # type: ignore[arg-type]
