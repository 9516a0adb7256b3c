"""Standard errors against lm-eval's definition (sample std / sqrt(n)) computed naively."""

import math

import pytest

from qalora.eval.stats import Estimate, accuracy, average, binomial_stderr, item_weighted


def _lm_eval_mean_stderr(xs):  # lm_eval.api.metrics.mean_stderr, written out
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


@pytest.mark.parametrize("correct", [[1, 0], [1, 1, 0, 0, 1], [0] * 7 + [1] * 193, [1] * 10])
def test_binomial_stderr_is_lm_evals_mean_stderr(correct):
    est = accuracy([bool(c) for c in correct])
    assert est.n == len(correct) and est.value == sum(correct) / len(correct)
    assert est.stderr == pytest.approx(_lm_eval_mean_stderr(correct), rel=1e-12, abs=1e-15)


def test_reference_figure_in_facts():  # PIQA, 200 items, acc 0.640: lm-eval prints 0.034
    assert binomial_stderr(0.64, 200) == pytest.approx(0.0340, abs=5e-5)


def test_stderr_undefined_below_two_items():
    assert binomial_stderr(1.0, 1) is None and accuracy([True]).stderr is None
    with pytest.raises(ValueError):
        accuracy([])


def test_average_macro_and_item_weighted():
    a, b = Estimate(0.5, 0.1, 10), Estimate(0.8, 0.05, 30)
    macro = average([a, b])
    assert macro.value == pytest.approx(0.65) and macro.n == 40
    assert macro.stderr == pytest.approx(math.sqrt(0.1 ** 2 + 0.05 ** 2) / 2)
    w = item_weighted([a, b])
    assert w.value == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
    assert w.stderr == pytest.approx(math.sqrt((0.25 * 0.1) ** 2 + (0.75 * 0.05) ** 2))
    assert average([a, Estimate(0.3, None, 1)]).stderr is None
    with pytest.raises(ValueError):
        average([])


def test_item_weighted_matches_pooled_items_for_equal_means():
    # two strata with the same mean: the stratified se is close to the se of all items pooled
    parts = [accuracy([True] * 15 + [False] * 35), accuracy([True] * 15 + [False] * 35)]
    pooled = accuracy([True] * 30 + [False] * 70)
    assert item_weighted(parts).value == pooled.value
    assert item_weighted(parts).stderr == pytest.approx(pooled.stderr, rel=0.02)
