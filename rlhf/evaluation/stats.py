"""Paired statistics over eval prompts, and pass@k.

The same held-out prompts are answered at every evaluation, so a change is measured per prompt
(after - before) and judged by the mean difference against its standard error: this removes
the prompts' own spread from the noise, which a difference of two means would keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """mean (after - before), its standard error, the t statistic, and n prompts; better/worse counts."""

    mean: float
    se: float
    t: float
    n: int
    better: int
    worse: int

    def text(self) -> str:
        return f"{self.mean:+.4g} ± {self.se:.2g} (t={self.t:.2f}, n={self.n}, {self.better} up / {self.worse} down)"


def paired_difference(before: list[float], after: list[float]) -> Paired:
    """Paired difference of two score lists over the same prompts (same order).

    se = sd(diff) / sqrt(n) with the n-1 sample sd; t = mean / se (0 when both are 0, +-inf
    when every prompt moved by the same nonzero amount)."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same prompts: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        return Paired(0.0, 0.0, 0.0, 0, 0, 0)
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return Paired(mean, se, t, n, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_prompt_means(values: list[float], prompt_index: list[int], num_prompts: int) -> list[float]:
    """Mean of each prompt's samples' values (k samples per prompt -> one score per prompt)."""
    sums, counts = [0.0] * num_prompts, [0] * num_prompts
    for v, i in zip(values, prompt_index, strict=True):
        sums[i] += v
        counts[i] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]
