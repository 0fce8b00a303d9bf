"""kdpipe.stats against values worked out by hand (or by an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpipe.stats import (
    discordant_pairs,
    gap_closed,
    is_significant,
    mcnemar_exact_p,
    paired_bootstrap_diff,
    wilson_interval,
)

# ---- McNemar (exact, two-sided) ---------------------------------------------------------------


def test_mcnemar_hand_table():
    # b=1, c=9: n=10 discordant images, p = 2·(C(10,0) + C(10,1)) / 2^10 = 2·11/1024
    assert mcnemar_exact_p(1, 9) == 0.021484375
    assert mcnemar_exact_p(9, 1) == 0.021484375  # two-sided: symmetric
    # b=0, c=5: p = 2·C(5,0)/2^5 = 2/32
    assert mcnemar_exact_p(0, 5) == 0.0625
    # b=2, c=6: p = 2·(1 + 8 + 28)/256 = 74/256
    assert mcnemar_exact_p(2, 6) == pytest.approx(74 / 256, abs=0, rel=1e-15)


@pytest.mark.parametrize("b", [1, 3, 50])
def test_mcnemar_equal_discordant_counts_is_one(b):
    # b=c: 2·P(X <= n/2) > 1 for a symmetric binomial, capped at 1
    assert mcnemar_exact_p(b, b) == 1.0


def test_mcnemar_no_discordant_pair_is_one():
    assert mcnemar_exact_p(0, 0) == 1.0


def test_mcnemar_matches_scipy_binomtest_on_large_counts():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(40, 62), (480, 530), (2000, 2150), (3, 0)]:
        expected = scipy_stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_discordant_pairs_hand_example():
    a = [True, True, False, False, True, False]
    b = [True, False, True, False, False, False]
    # only a right: images 1 and 4; only b right: image 2
    assert discordant_pairs(a, b) == (2, 1)
    assert discordant_pairs(b, a) == (1, 2)
    with pytest.raises(ValueError, match="same length"):
        discordant_pairs(a, b[:-1])


# ---- Wilson ------------------------------------------------------------------------------------


def test_wilson_eight_of_ten_by_hand():
    # p = 0.8, n = 10, z = 1.96, z² = 3.8416
    # centre = (0.8 + 3.8416/20) / (1 + 3.8416/10) = 0.99208 / 1.38416 = 0.716738...
    # half   = 1.96·sqrt(0.8·0.2/10 + 3.8416/400) / 1.38416 = 1.96·sqrt(0.025604) / 1.38416 = 0.226582...
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.716738 - 0.226582, abs=2e-6)
    assert high == pytest.approx(0.716738 + 0.226582, abs=2e-6)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


@pytest.mark.parametrize("n", [1, 10, 269, 1017])
def test_wilson_at_zero_and_at_n_closed_form(n):
    z2 = 1.96**2
    # p = 0: centre = half = (z²/2n)/(1 + z²/n), so the interval is [0, z²/(n + z²)]
    assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)), abs=1e-12)
    # p = 1: by symmetry [n/(n + z²), 1]
    assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0), abs=1e-12)


def test_wilson_is_symmetric_contains_p_and_shrinks_with_n():
    low, high = wilson_interval(30, 100)
    low_c, high_c = wilson_interval(70, 100)
    assert low == pytest.approx(1 - high_c) and high == pytest.approx(1 - low_c)
    assert low < 0.3 < high
    assert wilson_interval(300, 1000)[1] - wilson_interval(300, 1000)[0] < high - low
    # a wider z gives a wider interval
    assert wilson_interval(30, 100, z=2.576)[0] < low


@pytest.mark.parametrize(("correct", "n"), [(1, 0), (-1, 5), (6, 5)])
def test_wilson_rejects_impossible_counts(correct, n):
    with pytest.raises(ValueError):
        wilson_interval(correct, n)


# ---- paired bootstrap --------------------------------------------------------------------------


def _pair(n: int, only_a: int, only_b: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with the given counts of each kind of image, shuffled."""
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * (n - only_a - only_b - both))
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * (n - only_a - only_b - both))
    order = np.random.default_rng(0).permutation(n)
    return a[order], b[order]


def test_bootstrap_is_deterministic_for_a_seed():
    a, b = _pair(300, 20, 10, 240)
    first = paired_bootstrap_diff(a, b, 2000, seed=42)
    assert paired_bootstrap_diff(a, b, 2000, seed=42) == first
    assert paired_bootstrap_diff(a.tolist(), b.tolist(), 2000, seed=42) == first  # lists work the same
    # the seed does move the ends (on a 1/300 grid, so some seeds land on the same values)
    others = [paired_bootstrap_diff(a, b, 2000, seed=s) for s in range(10)]
    assert {o[0] for o in others} == {first[0]}
    assert len({o[1:] for o in others}) > 1


def test_bootstrap_diff_is_the_accuracy_difference_and_the_interval_contains_it():
    a, b = _pair(300, 20, 10, 240)
    diff, low, high = paired_bootstrap_diff(a, b, 2000, seed=1)
    assert diff == pytest.approx((260 - 250) / 300)  # accuracies 260/300 and 250/300
    assert low < diff < high
    # reversed pair: the mirror image
    diff_r, low_r, high_r = paired_bootstrap_diff(b, a, 2000, seed=1)
    assert diff_r == pytest.approx(-diff)
    assert low_r < diff_r < high_r


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    # the paired difference of proportions has SE = sqrt((pb + pc − (pb − pc)²) / n)
    n, only_a, only_b = 1000, 60, 35
    a, b = _pair(n, only_a, only_b, 800)
    diff, low, high = paired_bootstrap_diff(a, b, 4000, seed=7)
    pb, pc = only_a / n, only_b / n
    se = math.sqrt((pb + pc - (pb - pc) ** 2) / n)
    assert low == pytest.approx(diff - 1.96 * se, abs=0.15 * se * 1.96 + 1 / n)
    assert high == pytest.approx(diff + 1.96 * se, abs=0.15 * se * 1.96 + 1 / n)


def test_bootstrap_interval_shrinks_with_n():
    a, b = _pair(100, 8, 4, 80)
    _, low, high = paired_bootstrap_diff(a, b, 2000, seed=3)
    a10, b10 = np.tile(a, 10), np.tile(b, 10)  # same accuracies, ten times the images
    diff10, low10, high10 = paired_bootstrap_diff(a10, b10, 2000, seed=3)
    assert diff10 == pytest.approx(0.04)
    assert high10 - low10 < (high - low) / 2  # about 1/sqrt(10) as wide
    assert low10 < diff10 < high10


def test_bootstrap_identical_vectors_give_zero_and_a_zero_width_interval():
    a, _ = _pair(200, 30, 0, 120)
    assert paired_bootstrap_diff(a, a.copy(), 2000, seed=0) == (0.0, 0.0, 0.0)


def test_bootstrap_large_test_set_is_chunked_without_changing_the_answer_shape():
    a, b = _pair(12_000, 300, 250, 9000)  # 2000 × 12000 draws go through several chunks
    diff, low, high = paired_bootstrap_diff(a, b, 2000, seed=5)
    assert low < diff < high and high - low < 0.02


def test_bootstrap_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_diff([True, False], [True], 2000, 0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([], [], 2000, 0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([True], [False], 0, 0)
    with pytest.raises(ValueError, match="booleans"):
        paired_bootstrap_diff([0, 2], [1, 1], 2000, 0)


# ---- gap closed and the verdict -------------------------------------------------------------------


def test_gap_closed_hand_values():
    assert gap_closed(0.90, 0.80, 1.00) == pytest.approx(0.5)
    assert gap_closed(1.00, 0.80, 1.00) == pytest.approx(1.0)  # matches the teacher
    assert gap_closed(0.80, 0.80, 1.00) == pytest.approx(0.0)  # matches the baseline
    assert gap_closed(0.70, 0.80, 1.00) == pytest.approx(-0.5)  # below the baseline
    assert gap_closed(1.10, 0.80, 1.00) == pytest.approx(1.5)  # above the teacher


def test_gap_closed_is_undefined_when_the_teacher_is_not_above_the_baseline():
    assert gap_closed(0.90, 0.80, 0.80) is None  # no gap
    assert gap_closed(0.90, 0.85, 0.80) is None  # the baseline beats the teacher (digits)


def test_is_significant_needs_both_tests():
    assert is_significant(0.5, 2.0, 0.01)
    assert is_significant(-3.0, -0.2, 0.001)  # significantly worse counts too
    assert not is_significant(-0.4, 2.9, 0.14)  # interval includes 0
    assert not is_significant(0.1, 2.0, 0.06)  # interval excludes 0 but p >= 0.05
    assert not is_significant(-0.1, 2.0, 0.04)  # p < 0.05 but interval includes 0
    assert not is_significant(0.1, 2.0, 0.05)  # p < 0.05 is strict
