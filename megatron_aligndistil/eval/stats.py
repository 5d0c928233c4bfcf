"""Rates with 95% confidence intervals.

Samples drawn for the same prompt are correlated (a policy that knows the answer to a prompt
gets all K samples right), so the unit of independence is the prompt: a gold rate is the mean of
per-prompt means, and its interval is the normal interval of that mean over prompts (with several
seeds, over (seed, prompt) clusters). Treating every sample as independent would make intervals
too narrow by up to sqrt(K).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def mean_ci(values, z: float = Z95, bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict:
    """``{"mean", "lo", "hi", "n"}``: mean of ``values`` (one per cluster) +- z * standard error,
    clipped to ``bounds``. One value gives a zero-width interval (nothing to estimate spread from)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (independent trials)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 (p = 1) the bound is exactly 0 (1); the float sum lands an ulp away
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def per_cluster_means(values, clusters) -> list[float]:
    """Means of ``values`` grouped by the matching ``clusters`` key, in first-seen order."""
    sums: dict = {}
    for v, c in zip(values, clusters):
        s = sums.setdefault(c, [0.0, 0])
        s[0] += float(v)
        s[1] += 1
    return [s / k for s, k in sums.values()]


def fmt_ci(ci: dict, digits: int = 3) -> str:
    """``0.512 [0.471, 0.553]``."""
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
