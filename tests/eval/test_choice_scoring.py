"""acc / acc_norm decisions against a naive reference, and items scored on the tiny model."""

import pytest

from qalora.eval.choice_scoring import argmax_first, predict, score_items
from qalora.eval.scoring import loglikelihoods
from qalora.eval.task_spec import ChoiceItem


def _naive_predict(logliks, lengths):
    best = max(logliks)
    pred = logliks.index(best)
    normed = [ll / n for ll, n in zip(logliks, lengths)]
    return pred, normed.index(max(normed))


@pytest.mark.parametrize("logliks, lengths, expected", [
    ([-10.0, -12.0], [5, 20], (0, 1)),          # the longer choice wins per character
    ([-3.0, -3.0, -5.0], [2, 2, 2], (0, 0)),   # ties: the first
    ([-7.5, -2.0, -2.5, -9.0], [1, 1, 1, 1], (1, 1)),
    ([-4.0, -6.0, -1.0], [4, 12, 0], (2, 1)),   # zero length counts as 1 (-1.0 < -0.5)
])
def test_predict(logliks, lengths, expected):
    assert predict(logliks, lengths) == expected
    if 0 not in lengths:
        assert predict(logliks, lengths) == _naive_predict(logliks, lengths)
    assert argmax_first([1, 3, 3]) == 1


def test_items_against_one_request_at_a_time(tiny_model, tiny_tok):
    shared = ChoiceItem(requests=(("the quick brown fox", " jumps"), ("the quick brown fox", " sleeps over it")),
                        gold=1, lengths=(5, 14))
    letters = ChoiceItem(requests=tuple(("a model keeps weights in:", f" {x}") for x in "ABCD"), gold=2,
                         lengths=(1, 1, 1, 1))
    partial = ChoiceItem(requests=(("low rank adapters", " learn a small update"),
                                   ("group wise scales", " learn a small update")), gold=0, lengths=(17, 17))
    items = [shared, letters, partial]
    got = score_items(tiny_model, tiny_tok, items, batch_size=2)
    for item, res in zip(items, got):
        ref = [s.loglik for s in loglikelihoods(tiny_model, tiny_tok, list(item.requests), batch_size=1)]
        assert res.logliks == pytest.approx(ref, rel=1e-4, abs=1e-4)  # fp32, other op order: 1e-4
        assert (res.pred, res.pred_norm) == _naive_predict(ref, list(item.lengths))
        assert res.acc == (res.pred == item.gold) and res.acc_norm == (res.pred_norm == item.gold)


def test_too_long_items_are_truncated_not_refused(tiny_model, tiny_tok):
    long_ctx = "the quick brown fox jumps over the lazy dog " * 20  # > 256 positions of the tiny model
    item = ChoiceItem(requests=((long_ctx, " yes"), (long_ctx, " no")), gold=0, lengths=(3, 2))
    (res,) = score_items(tiny_model, tiny_tok, [item], max_length=64)
    assert len(res.logliks) == 2 and all(ll < 0 for ll in res.logliks)
