import pytest
import torch

from rlhf.algos import contiguous_group_ids, informative_group_rows, whole_group_count


def test_groups_with_equal_scores_are_dropped():
    # groups of 3: mixed, all equal, mixed, all equal
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert informative_group_rows(scores, contiguous_group_ids(12, 3)).tolist() == [0, 1, 2, 6, 7, 8]


def test_groups_are_found_by_id_in_any_order_and_size():
    # group 7: rows 0, 3 (mixed); group 2: rows 1, 4, 5 (equal); group 9: row 2 alone (equal)
    scores = torch.tensor([1.0, 0.5, 4.0, 0.0, 0.5, 0.5])
    assert informative_group_rows(scores, torch.tensor([7, 2, 9, 7, 2, 2])).tolist() == [0, 3]


def test_no_informative_group_gives_no_rows():
    assert informative_group_rows(torch.ones(8), contiguous_group_ids(8, 4)).numel() == 0


@pytest.mark.parametrize(
    "count, n, global_batch, expected",
    [
        (64, 8, 64, 64),
        (63, 8, 64, 0),
        (100, 4, 16, 96),
        (48, 8, 12, 48),
        (47, 8, 12, 24),
        (5, 2, 4, 4),
    ],
)
def test_whole_group_count(count, n, global_batch, expected):
    k = whole_group_count(count, n, global_batch)
    assert k == expected and k % n == 0 and k % global_batch == 0
