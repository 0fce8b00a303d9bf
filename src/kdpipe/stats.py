"""Uncertainty of test-set accuracies, and of the difference between two models scored on the
same test images: pure functions on per-image correctness, no torch, no files.

- :func:`wilson_interval`: the 95% Wilson score interval of one model's accuracy.
- :func:`paired_bootstrap_diff`: the accuracy difference of two models and its 95% percentile
  bootstrap interval, resampling test images (both models keep their answers on the same
  images: the pairing is what makes the interval narrower than two separate ones).
- :func:`discordant_pairs` and :func:`mcnemar_exact_p`: the exact McNemar test on the images
  where exactly one of the two models is right.
- :func:`gap_closed`: the share of the teacher–baseline gap a student closes.

Accuracies here are fractions in [0, 1]; callers convert to percent or points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Correctness = Sequence[bool] | np.ndarray

# Index draws per bootstrap chunk (resamples × images); bounds memory on large test sets.
_CHUNK_ELEMENTS = 4_000_000


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n``, as fractions.

    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``: unlike the normal (Wald)
    interval it stays inside [0, 1] and does not collapse to a point at 0% or 100%.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct}, n={n}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_correctness(values: Correctness, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of per-image correctness, got shape {array.shape}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1), one per test image")
        array = array.astype(bool)
    return array


def paired_bootstrap_diff(correct_a: Correctness, correct_b: Correctness, resamples: int,
                          seed: int) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, with a 95% percentile
    bootstrap interval: ``(diff, low, high)`` as fractions.

    Each resample draws ``n`` image indices with replacement (numpy ``Generator(PCG64(seed))``)
    and takes the mean of ``correct_a − correct_b`` over them; the interval is the 2.5th and
    97.5th percentiles of those means. Same inputs and seed give the same interval.
    """
    a = _as_correctness(correct_a, "correct_a")
    b = _as_correctness(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must have the same length, got {a.size} and {b.size}")
    n = a.size
    if n == 0:
        raise ValueError("paired_bootstrap_diff needs at least one image")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    per_image = a.astype(np.int8) - b.astype(np.int8)  # +1, 0 or -1 per image
    diff = float(per_image.mean())
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        means[start:start + rows] = per_image[idx].sum(axis=1, dtype=np.int64) / n
    low, high = np.percentile(means, [2.5, 97.5])
    return diff, float(low), float(high)


def discordant_pairs(correct_a: Correctness, correct_b: Correctness) -> tuple[int, int]:
    """``(b, c)``: images only ``a`` got right, and images only ``b`` got right."""
    a = _as_correctness(correct_a, "correct_a")
    b = _as_correctness(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must have the same length, got {a.size} and {b.size}")
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under "both models are equally accurate" each of the
    ``b + c`` discordant images is a fair coin, so ``p = min(1, 2·P(X <= min(b, c)))`` with
    ``X ~ Binomial(b + c, 1/2)``; 1 when there is no discordant image. Exact integer
    arithmetic, so it stays right for thousands of discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def gap_closed(acc_student: float, acc_baseline: float, acc_teacher: float) -> float | None:
    """Share of the teacher–baseline gap the student closes:
    ``(student − baseline) / (teacher − baseline)``; 1 means it matches the teacher, 0 the
    baseline, negative values are below the baseline. ``None`` when the teacher is not above
    the baseline: there is no gap to close, and the ratio would be meaningless.
    """
    gap = acc_teacher - acc_baseline
    if gap <= 0:
        return None
    return (acc_student - acc_baseline) / gap


def is_significant(low: float, high: float, p_value: float, alpha: float = 0.05) -> bool:
    """Both tests agree the difference is real: the interval excludes 0 and ``p < alpha``."""
    return (low > 0 or high < 0) and p_value < alpha
