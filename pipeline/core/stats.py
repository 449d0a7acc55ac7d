"""Paired differences over seeds: mean, sample standard deviation and a Student-t confidence interval.

BAN-k and control-k of one seed share the seed, the initial weights and the batch order, so their
difference d_i = BAN-k_i - control-k_i is a paired observation; over n seeds the interval is
mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n). The t quantile is computed here (exact CDF for
integer degrees of freedom, Abramowitz & Stegun 26.7.3-4, inverted by bisection): no scipy needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` >= 1 degrees of freedom (t >= 0)."""
    if df < 1:
        raise ValueError(f"df = {df}: Student's t needs at least 1 degree of freedom")
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, c  # term k: cos^(2k+1) * (2*4*...*2k) / (3*5*...*(2k+1))
        for k in range(0, (df - 1) // 2):
            if k > 0:
                term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    total, term = 0.0, 1.0  # term k: cos^(2k) * (1*3*...*(2k-1)) / (2*4*...*2k)
    for k in range(0, df // 2):
        if k > 0:
            term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level: the half-width multiplier of a two-sided `level` interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level = {level}: must be strictly between 0 and 1")
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf_two_sided(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences a_i - b_i over n seeds (same units as the inputs)."""

    n: int
    mean: float
    sd: float  # sample standard deviation of the differences (nan for n = 1)
    half_width: float  # t_{(1+level)/2, n-1} * sd / sqrt(n) (nan for n = 1)
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """Paired mean of a - b with its two-sided t-interval; a[i] and b[i] come from the same seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: need two equally long, non-empty sequences (got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n == 1:
        return Paired(1, d[0], math.nan, math.nan, level)
    sd = statistics.stdev(d)
    return Paired(n, statistics.mean(d), sd, t_quantile(level, n - 1) * sd / math.sqrt(n), level)
