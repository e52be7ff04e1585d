"""Schedules: learning-rate multipliers of the base LR (for torch's LambdaLR), and which steps
asynchronous rollouts generate ahead."""

from __future__ import annotations

import math
from collections.abc import Callable, Container


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """step -> LR multiplier: linear warmup over `warmup_steps`, then constant, linear or cosine decay to 0."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown LR schedule {kind!r}; choose constant, linear or cosine")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def steps_to_prefetch(step: int, max_staleness: int, total_steps: int, in_flight: Container[int]) -> list[int]:
    """Steps whose generation should start once step `step` has its samples: every step up to
    `max_staleness` ahead (never past `total_steps`) not already in flight. Started now, on the
    weights of step `step - 1` (this step's update comes later), step s = step + j trains on
    weights j updates newer: staleness j <= max_staleness."""
    last = min(step + max_staleness, total_steps)
    return [s for s in range(step + 1, last + 1) if s not in in_flight]
