"""Which samples of a step to train on: DAPO's dynamic sampling and whole-group trimming.

Samples of one prompt are contiguous groups of n (as everywhere in rlhf/algos).
"""

from __future__ import annotations

import torch

from rlhf.algos.advantages import EQUAL_SCORE_TOL, equal_score_groups


def informative_group_rows(scores: torch.Tensor, n: int, tol: float = EQUAL_SCORE_TOL) -> torch.Tensor:
    """Row indices (long) of the groups whose n scores are not all equal.

    scores (B,) with B = P * n. A group whose samples all get the same reward has zero
    group-relative advantage, so it adds no signal, only cost (DAPO, Yu et al. 2025). "All
    equal" is `equal_score_groups`, the rule that gives such a group advantage 0, so a group
    is dropped here exactly when the group estimators would give it no signal.
    """
    keep = ~equal_score_groups(scores, n, tol)  # (P,)
    return keep.repeat_interleave(n).nonzero().flatten()


def whole_group_count(count: int, n: int, global_batch: int) -> int:
    """The largest k <= count that is a multiple of both n (whole groups) and global_batch
    (whole optimizer steps). 0 when none fits."""
    step = global_batch * n // torch.gcd(torch.tensor(global_batch), torch.tensor(n)).item()
    return count - count % step
