"""Paired comparison of two models on the same items, against naive references."""

import math
import random
import statistics

import pytest

from qalora.eval.paired import align, mcnemar_exact, paired, verdict


def test_paired_difference_and_stderr_equal_a_naive_reference():
    a = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    b = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1]
    d = [x - y for x, y in zip(a, b)]                     # [0, 1, 0, 0, -1, 1, 0, 0, 1, 0]
    p = paired(a, b)
    assert p.n == 10 and p.a_only == 3 and p.b_only == 1
    assert p.diff == pytest.approx(sum(a) / 10 - sum(b) / 10, abs=1e-15)   # 0.7 - 0.5
    assert p.stderr == pytest.approx(statistics.stdev(d) / math.sqrt(10), rel=1e-12)
    # unpaired se of the same data (independent binomials) is larger: most items agree
    se_a, se_b = (statistics.stdev(x) / math.sqrt(10) for x in (a, b))
    assert p.stderr < math.sqrt(se_a ** 2 + se_b ** 2)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(2, 1) == 1.0                       # P[X <= 1 | 3, 1/2] = 4/8, doubled
    assert mcnemar_exact(8, 0) == pytest.approx(2 / 256, abs=0)
    assert mcnemar_exact(0, 0) == 1.0
    # 10 vs 3 discordant: 2 * sum_{j<=3} C(13, j) / 2^13
    assert mcnemar_exact(10, 3) == pytest.approx(2 * (1 + 13 + 78 + 286) / 8192, rel=1e-15)
    scipy_stats = pytest.importorskip("scipy.stats")
    for n10, n01 in ((10, 3), (5, 9), (40, 22)):
        want = scipy_stats.binomtest(min(n10, n01), n10 + n01, 0.5).pvalue
        assert mcnemar_exact(n10, n01) == pytest.approx(want, rel=1e-9)


def test_align_matches_items_by_key_and_verdict_needs_two_stderrs():
    a = {"index": ["3", "1", "2"], "acc": [1, 0, 1]}
    b = {"index": ["1", "2", "9"], "acc": [1, 1, 0]}
    assert align(a, b, "acc") == ([0, 1], [1, 1])           # items 1 and 2, in a's order
    with pytest.raises(ValueError, match="share no scored item"):
        align(a, {"index": ["7"], "acc": [1]}, "acc")
    with pytest.raises(ValueError, match="same items"):
        paired([1, 0], [1])
    assert verdict(0.05, 0.02) == "beat" and verdict(-0.05, 0.02) == "lost to"
    assert verdict(0.03, 0.02).startswith("showed no") and verdict(0.3, None).startswith("showed no")


def test_paired_power_on_correlated_rows():
    """Two rows that differ on 30 of 1000 items (25 + / 5 -): unpaired they are within noise,
    paired the difference is called."""
    rng = random.Random(0)
    b = [int(rng.random() < 0.5) for _ in range(1000)]
    a = list(b)
    flips = rng.sample(range(1000), 30)
    for k, i in enumerate(flips):
        a[i] = 1 if k < 25 else 0
        b[i] = 0 if k < 25 else 1
    p = paired(a, b)
    assert p.a_only == 25 and p.b_only == 5 and p.diff == pytest.approx(0.02)
    unpaired = math.sqrt(sum(statistics.pvariance(x) / 999 for x in (a, b)))
    assert verdict(p.diff, unpaired).startswith("showed no") and verdict(p.diff, p.stderr) == "beat"
    assert p.mcnemar_p < 0.001
