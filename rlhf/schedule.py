"""Learning-rate schedules as multipliers of the base LR (for torch's LambdaLR)."""
from __future__ import annotations

import math
from typing import Callable


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
