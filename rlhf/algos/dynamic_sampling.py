"""Which samples of a step to train on: DAPO's dynamic sampling and whole-group trimming.

Groups are given by `group_ids` (B,) long, in any order and of any sizes (groups.py).
"""

from __future__ import annotations

import math

import torch

from rlhf.algos.groups import EQUAL_SCORE_TOL, equal_score_groups


def informative_group_rows(scores: torch.Tensor, group_ids: torch.Tensor, tol: float = EQUAL_SCORE_TOL) -> torch.Tensor:
    """Row indices (long, ascending) of the rows whose group's scores are not all equal.

    scores (B,), group_ids (B,). A group whose samples all get the same reward has zero
    group-relative advantage, so it adds no signal, only cost (DAPO, Yu et al. 2025). "All
    equal" is `equal_score_groups`, the rule that gives such a group advantage 0, so a group
    is dropped here exactly when the group estimators would give it no signal.
    """
    return (~equal_score_groups(scores, group_ids, tol)).nonzero().flatten()


def whole_group_count(count: int, n: int, global_batch: int) -> int:
    """The largest k <= count that is a multiple of both n (whole groups) and global_batch
    (whole optimizer steps). 0 when none fits. Assumes groups of n contiguous rows."""
    step = global_batch * n // math.gcd(global_batch, n)
    return count - count % step
