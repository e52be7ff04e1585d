"""Groups of samples by explicit group id: the statistics group-relative estimators share.

A group is the set of rows with one `group_ids` value (the samples of one prompt). group_ids is
a LongTensor (B,) in any order, with groups of any size: rows of a group need not be contiguous,
and one group may have 8 rows where another has 3 (after dropped samples, or multi-turn
episodes). Every statistic is computed in float64 and returned per row, so callers never reshape.

Equal scores: a group whose scores differ by at most `EQUAL_SCORE_TOL` x max(1, largest |score|)
carries no group-relative signal. The group estimators give it advantage 0 exactly and dynamic
sampling drops it: one rule, `equal_score_groups`. (In float32, eight copies of 0.3 have a std of
~1e-8; divided by std + eps that rounding noise became an advantage of 0.03.)
"""

from __future__ import annotations

import torch

# Scores that differ by at most this fraction of max(1, the group's largest |score|) are equal:
# a few float32 rounding steps (float32 resolves ~6e-8 relative), far below any real reward gap.
EQUAL_SCORE_TOL = 1e-6


def contiguous_group_ids(batch_size: int, group_size: int) -> torch.Tensor:
    """Group ids (B,) of a batch laid out as contiguous groups: rows [0, n) are group 0, [n, 2n)
    group 1, ... This is how rollouts return the n samples of each prompt today."""
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"a batch of {batch_size} rows is not a whole number of groups of {group_size}")
    return torch.arange(batch_size) // group_size


def group_index(group_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense group index of each row (B,) in [0, G), rows per group (G,)) for ids in any order."""
    if group_ids.dim() != 1 or group_ids.numel() != batch_size:
        raise ValueError(f"group_ids must have shape ({batch_size},), got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError("group_ids must be integers (a LongTensor)")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def group_sum(values: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group sum (G,) of per-row values (B,), in the values' dtype."""
    return values.new_zeros(n_groups).index_add_(0, inverse, values)


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, in float64, of the row's group: (scores (B,), group sum (B,), group size (B,)).

    The sum rather than the mean, so leave-one-out baselines ((sum - s) / (n - 1)) need no
    second pass; mean = sum / size.
    """
    x = scores.double()
    inverse, counts = group_index(group_ids, x.numel())
    sums = group_sum(x, inverse, counts.numel())
    return x, sums[inverse], counts[inverse].double()


@torch.no_grad()
def equal_score_groups(scores: torch.Tensor, group_ids: torch.Tensor, tol: float = EQUAL_SCORE_TOL) -> torch.Tensor:
    """For each row (B,) bool: are all the scores of its group equal?

    Equal means max - min <= tol * max(1, max |score|) over the group, in float64: exact ties
    and ties up to float32 rounding alike. A group of one row is equal (there is nothing to
    compare it with). A group with a NaN is not equal (the NaN reaches the advantages, where the
    trainer's non-finite guard sees it).
    """
    x = scores.double()
    inverse, counts = group_index(group_ids, x.numel())
    G = counts.numel()
    # amax / amin propagate NaN, so a group with a NaN has a NaN spread and compares False.
    high = x.new_full((G,), -torch.inf).scatter_reduce(0, inverse, x, "amax")
    low = x.new_full((G,), torch.inf).scatter_reduce(0, inverse, x, "amin")
    scale = x.new_ones(G).scatter_reduce(0, inverse, x.abs(), "amax")  # max(1, max |score|)
    equal = (high - low) <= tol * scale  # (G,)
    return equal[inverse]
