"""The order in which a run visits its training rows."""

from __future__ import annotations

from typing import Any

import torch


class PromptStream:
    """Prompts in a seeded shuffled order, epoch after epoch; `position` is what a resume restores."""

    def __init__(self, rows: list[dict[str, Any]], seed: int, position: int = 0):
        if not rows:
            raise ValueError("no training prompts")
        self.rows, self.seed, self.position = rows, seed, position

    def next(self, k: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(k):
            epoch, i = divmod(self.position, len(self.rows))
            order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(self.rows[order[i]])
            self.position += 1
        return out
