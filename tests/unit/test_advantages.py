"""rlhf.algos.advantages against Python-loop references and closed forms."""

import pytest
import torch

from rlhf.algos.advantages import (
    broadcast_sequence_advantages,
    compute_gae_advantages,
    compute_grpo_advantages,
    compute_reinforce_plus_plus_advantages,
    compute_reinforce_plus_plus_baseline_scores,
    compute_reinforce_plus_plus_returns,
    compute_rloo_advantages,
    compute_token_rewards,
)
from rlhf.algos.dynamic_sampling import informative_group_rows
from rlhf.algos.groups import EQUAL_SCORE_TOL, contiguous_group_ids, equal_score_groups


def holey_mask(B, T, seed):
    """Random 0/1 masks: left padding, holes in the middle, right padding, an empty row."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 0  # left pad / prompt
    mask[-1] = 0  # an empty row
    return mask


def loop_gae(rewards, values, mask, gamma, lam):
    """Per row: compress to the valid tokens, run textbook GAE, scatter back."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        r = [rewards[b, t].item() for t in idx]
        v = [values[b, t].item() for t in idx] + [0.0]
        a = 0.0
        for i in reversed(range(len(idx))):
            a = r[i] + gamma * v[i + 1] - v[i] + gamma * lam * a
            adv[b, idx[i]] = a
    return adv


def loop_reward_to_go(rewards, mask, gamma):
    B, T = rewards.shape
    out = torch.zeros(B, T)
    for b in range(B):
        g = 0.0
        for t in reversed(range(T)):
            if mask[b, t] > 0:
                g = rewards[b, t].item() + gamma * g
                out[b, t] = g
    return out


def rand(B, T, seed):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0), (1.0, 0.7)])
def test_gae_matches_loop(gamma, lam):
    rewards, values, mask = rand(5, 9, 0), rand(5, 9, 1), holey_mask(5, 9, 2)
    adv, ret = compute_gae_advantages(rewards, values, mask, gamma, lam)
    expected = loop_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, torch.where(mask.bool(), expected + values, 0.0))


def test_gae_hand_example_discounting():
    # rewards [0, 0, 1], zero values, gamma 0.5, lam 1 -> [0.25, 0.5, 1]; a shifted exponent
    # (off-by-one) would give [0.5, 1, 1] or [0.125, 0.25, 0.5].
    adv, _ = compute_gae_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), 0.5, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 1.0]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = rand(4, 8, 3), rand(4, 8, 4), holey_mask(4, 8, 5)
    adv, _ = compute_gae_advantages(rewards, values, mask, 1.0, 1.0)
    expected = loop_reward_to_go(rewards, mask, 1.0) - values
    torch.testing.assert_close(adv, torch.where(mask.bool(), expected, 0.0), rtol=1e-5, atol=1e-5)


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values = rand(2, 5, 6), rand(2, 5, 7)
    mask = torch.tensor([[0.0, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    adv, _ = compute_gae_advantages(rewards, values, mask, 0.9, 0.0)
    for b, idx in enumerate([[1, 2, 3], [0, 1, 3, 4]]):
        nxt = [values[b, t].item() for t in idx[1:]] + [0.0]  # next *valid* value, 0 at end
        for t, v_next in zip(idx, nxt):
            td = rewards[b, t].item() + 0.9 * v_next - values[b, t].item()
            assert adv[b, t].item() == pytest.approx(td, abs=1e-5)


def test_gae_masked_positions_change_nothing():
    rewards, values, mask = rand(4, 7, 8), rand(4, 7, 9), holey_mask(4, 7, 10)
    junk = torch.full_like(rewards, 1e6)
    a1, r1 = compute_gae_advantages(rewards, values, mask, 0.99, 0.95)
    a2, r2 = compute_gae_advantages(
        torch.where(mask.bool(), rewards, junk),
        torch.where(mask.bool(), values, -junk),
        mask,
        0.99,
        0.95,
    )
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)
    assert torch.all(a1[~mask.bool()] == 0) and torch.all(r1[~mask.bool()] == 0)


def test_advantages_carry_no_gradient():
    values = rand(2, 4, 11).requires_grad_(True)
    adv, ret = compute_gae_advantages(rand(2, 4, 12), values, torch.ones(2, 4), 1.0, 0.9)
    assert not adv.requires_grad and not ret.requires_grad


def test_grpo_matches_loop():
    scores, G = torch.randn(12, generator=torch.Generator().manual_seed(13)), 4
    adv = compute_grpo_advantages(scores, ids(12, G))
    adv_dr = compute_grpo_advantages(scores, ids(12, G), normalize_std=False)
    for start in range(0, 12, G):
        grp = [scores[i].item() for i in range(start, start + G)]
        mean = sum(grp) / G
        std = (sum((s - mean) ** 2 for s in grp) / (G - 1)) ** 0.5
        for i, s in enumerate(grp):
            assert adv[start + i].item() == pytest.approx((s - mean) / (std + 1e-6), rel=1e-5)
            assert adv_dr[start + i].item() == pytest.approx(s - mean, abs=1e-6)


def test_grpo_identical_scores_give_zero():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5])
    adv = compute_grpo_advantages(scores, ids(9, 3))
    torch.testing.assert_close(adv[:6], torch.zeros(6))
    assert adv[6] > 0 and adv[7] < 0  # the better sample is pushed up, the worse down


ids = contiguous_group_ids  # (B, n) -> group ids of contiguous groups of n


def loop_group_advantages(scores, group_ids, kind, eps=1e-6, tol=EQUAL_SCORE_TOL):
    """Plain-Python (float64) GRPO / Dr. GRPO / RLOO over explicit group ids (any order, any
    sizes); a group equal up to tol, or of one row, gets exactly 0."""
    rows_of = {}
    for row, gid in enumerate(group_ids):
        rows_of.setdefault(gid, []).append(row)
    out = [0.0] * len(scores)
    for rows in rows_of.values():
        grp, G = [float(scores[r]) for r in rows], len(rows)
        if max(grp) - min(grp) <= tol * max(1.0, max(abs(s) for s in grp)):
            continue  # all equal (a group of one too): 0
        mean = sum(grp) / G
        for r, s in zip(rows, grp):
            if kind == "rloo":
                out[r] = s - (sum(grp) - s) / (G - 1)
            elif kind == "dr_grpo":
                out[r] = s - mean
            else:
                std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5
                out[r] = (s - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def group_fn(kind):
    """The tensor function of each group estimator, as (scores, group_ids) -> (B,)."""
    if kind == "rloo":
        return compute_rloo_advantages
    return lambda s, g: compute_grpo_advantages(s, g, normalize_std=kind == "grpo")


def _noisy_groups(G, seed):
    """float32 groups: random mixed ones, exact ties of values float32 cannot represent (the
    issue's 0.3 and 6.46), ties up to float32 rounding (one ulp apart), and small real gaps."""
    g = torch.Generator().manual_seed(seed)
    groups = [
        torch.randn(G, generator=g),
        torch.full((G,), 0.3),
        torch.full((G,), 6.46),
        torch.full((G,), -1234.5678),
        torch.randint(0, 2, (G,), generator=g).float(),
    ]
    ulp = torch.full((G,), 6.46)
    ulp[0] = torch.nextafter(ulp[0], torch.tensor(10.0))  # 6.46 and the next float32
    near = torch.full((G,), 0.3)
    near[-1] = 0.3 + 1e-4  # a real (if small) difference: must stay a signal
    return torch.cat(groups + [ulp, near]).float()


@pytest.mark.parametrize("G", [3, 6, 7, 8, 16])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_float64_loop_and_zero_equal_groups(G, kind):
    scores = _noisy_groups(G, seed=G)
    adv = group_fn(kind)(scores, ids(len(scores), G))
    expected = loop_group_advantages(scores.tolist(), ids(len(scores), G).tolist(), kind)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
    # groups 1-3 are exact ties, group 5 a tie up to one float32 step: exactly 0, not noise / std
    for k in (1, 2, 3, 5):
        assert torch.equal(adv[k * G : (k + 1) * G], torch.zeros(G)), (k, adv[k * G : (k + 1) * G])
    assert adv[6 * G :].abs().max() > 0  # a 1e-4 gap is a real difference


def test_issue_examples_eight_equal_float32_scores_give_exact_zero():
    # Before: 0.3 x 8 gave GRPO advantages of 0.029, 6.46 x 8 gave 0.32 (float32 std ~1e-8).
    for value in (0.3, 6.46):
        for G in (3, 6, 7, 8, 16):
            scores = torch.full((2 * G,), value, dtype=torch.float32)
            group_ids = ids(2 * G, G)
            for adv in (
                compute_grpo_advantages(scores, group_ids),
                compute_grpo_advantages(scores, group_ids, normalize_std=False),
                compute_rloo_advantages(scores, group_ids),
                compute_reinforce_plus_plus_baseline_scores(scores, group_ids),
            ):
                assert torch.equal(adv, torch.zeros(2 * G)), (value, G, adv)


def test_dynamic_sampling_and_advantages_share_one_equal_rule():
    """A group is dropped by dynamic sampling exactly when the group estimators give it 0."""
    for G in (3, 8):
        scores = _noisy_groups(G, seed=100 + G)
        group_ids = ids(len(scores), G)
        equal = equal_score_groups(scores, group_ids)  # (B,) per row
        assert informative_group_rows(scores, group_ids).tolist() == (~equal).nonzero().flatten().tolist()
        zero = compute_grpo_advantages(scores, group_ids) == 0
        assert torch.equal(zero, equal)
        per_group = equal.view(-1, G)[:, 0]
        assert [bool(per_group[k]) for k in (0, 1, 2, 3, 5, 6)] == [False, True, True, True, True, False]


def test_contiguous_group_ids_reject_ragged_groups_and_estimators_bad_ids():
    assert ids(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="whole number of groups"):
        ids(7, 4)
    with pytest.raises(ValueError, match="group_ids must have shape"):
        compute_grpo_advantages(torch.zeros(7), ids(8, 4))
    with pytest.raises(ValueError, match="integers"):
        compute_rloo_advantages(torch.zeros(4), torch.zeros(4))


def _shuffled_unequal_groups(seed):
    """Groups of sizes 1, 2, 3, 5 and 8 (mixed, all-equal, near-equal), rows shuffled, sparse ids."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        (torch.tensor([2.5]), 40),  # a group of one
        (torch.tensor([0.0, 1.0]), 7),
        (torch.full((3,), 0.3), 1000),  # all equal, not exact in float32
        (torch.randn(5, generator=g), 3),
        (torch.randint(0, 2, (8,), generator=g).float(), 12),
        (torch.full((5,), 6.46), 5),
    ]
    scores = torch.cat([s for s, _ in parts])
    group_ids = torch.cat([torch.full((len(s),), gid) for s, gid in parts])
    perm = torch.randperm(len(scores), generator=g)
    return scores[perm].float(), group_ids[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_with_shuffled_rows_and_unequal_group_sizes_match_loop(seed, kind):
    scores, group_ids = _shuffled_unequal_groups(seed)
    adv = group_fn(kind)(scores, group_ids)
    expected = loop_group_advantages(scores.tolist(), group_ids.tolist(), kind)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
    for gid in (40, 1000, 5):  # a group of one, and all-equal groups: exactly 0
        assert torch.equal(adv[group_ids == gid], torch.zeros(int((group_ids == gid).sum())))


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_do_not_depend_on_row_order(kind):
    scores, group_ids = _noisy_groups(8, seed=5), ids(56, 8)
    perm = torch.randperm(56, generator=torch.Generator().manual_seed(6))
    in_order = group_fn(kind)(scores, group_ids)
    shuffled = group_fn(kind)(scores[perm], group_ids[perm])
    torch.testing.assert_close(shuffled, in_order[perm], rtol=1e-6, atol=1e-7)


def test_equal_score_groups_per_row_and_nan():
    scores = torch.tensor([1.0, 2.0, float("nan"), 3.0, 3.0, 5.0, 1.0])
    group_ids = torch.tensor([0, 1, 1, 2, 2, 3, 0])
    # group 0 (rows 0, 6) equal; group 1 has a NaN: not equal; group 2 equal; group 3 of one: equal
    assert equal_score_groups(scores, group_ids).tolist() == [True, False, False, True, True, True, True]
    assert informative_group_rows(scores, group_ids).tolist() == [1, 2]


def test_rloo_baseline_is_mean_of_others():
    scores, G = torch.randn(9, generator=torch.Generator().manual_seed(14)), 3
    adv = compute_rloo_advantages(scores, ids(9, G))
    for i in range(9):
        start = i - i % G
        others = [scores[j].item() for j in range(start, start + G) if j != i]
        expected = scores[i].item() - sum(others) / len(others)
        assert adv[i].item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(adv.view(3, 3).sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    # groups of one have no other sample for a baseline: 0, not a division by zero
    assert torch.equal(compute_rloo_advantages(scores, ids(9, 1)), torch.zeros(9))


def test_reinforce_plus_plus_returns_match_loop():
    rewards, mask = rand(5, 8, 15), holey_mask(5, 8, 16)
    for gamma in (1.0, 0.9):
        got = compute_reinforce_plus_plus_returns(rewards, mask, gamma)
        expected = loop_reward_to_go(rewards, mask, gamma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reinforce_plus_plus_advantages_whitened_over_batch():
    rewards, mask = rand(5, 8, 17), holey_mask(5, 8, 18)
    adv, ret = compute_reinforce_plus_plus_advantages(rewards, mask, 0.95)
    vals = [ret[b, t].item() for b in range(5) for t in range(8) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    expected = torch.where(mask.bool(), (ret - mean) / std, 0.0)
    torch.testing.assert_close(adv, expected, rtol=1e-4, atol=1e-5)


def test_reinforce_plus_plus_baseline_subtracts_group_mean():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    got = compute_reinforce_plus_plus_baseline_scores(scores, ids(6, 3))
    torch.testing.assert_close(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 0.0, 1.0]))


def test_token_rewards_on_last_valid_token():
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    got = compute_token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0, 0]]))


def test_broadcast_sequence_advantages():
    mask = torch.tensor([[0.0, 1, 1], [1, 1, 0]])
    got = broadcast_sequence_advantages(torch.tensor([3.0, -2.0]), mask)
    torch.testing.assert_close(got, torch.tensor([[0.0, 3, 3], [-2, -2, 0]]))


# ---------------------------------------------------------------- the single entry point
from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages  # noqa: E402


def _entry_batch():
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(6, 7)
    for i, (a, b) in enumerate([(1, 4), (2, 7), (0, 3), (3, 6), (1, 2), (2, 5)]):
        mask[i, a:b] = 1
    return torch.randn(6, generator=g), mask, torch.randn(6, 7, generator=g)


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_compute_advantages_is_zero_off_mask_and_finite(estimator):
    scores, mask, values = _entry_batch()
    adv, returns = compute_advantages(estimator, scores, mask, group_ids=ids(6, 3), values=values)
    assert adv.shape == mask.shape and torch.isfinite(adv).all()
    assert (adv[mask == 0] == 0).all()
    assert (returns is not None) == ADVANTAGE_ESTIMATORS[estimator].needs_critic


@pytest.mark.parametrize("estimator", [e.name for e in ADVANTAGE_ESTIMATORS.entries() if e.needs_groups])
def test_group_estimators_say_so_and_need_group_ids(estimator):
    scores, mask, _ = _entry_batch()
    with pytest.raises(ValueError, match="pass group_ids"):
        compute_advantages(estimator, scores, mask)


def test_compute_advantages_group_estimators_match_their_functions():
    scores, mask, _ = _entry_batch()
    adv, _ = compute_advantages("grpo", scores, mask, group_ids=ids(6, 3))
    expected = compute_grpo_advantages(scores, ids(6, 3))
    for i in range(6):
        assert torch.allclose(adv[i][mask[i].bool()], expected[i].expand(int(mask[i].sum())))
    adv, _ = compute_advantages("dr_grpo", scores, mask, group_ids=ids(6, 3))
    assert torch.allclose(adv[0, 1], scores[0] - scores[:3].mean())


def test_kl_in_reward_lowers_group_advantage_of_the_divergent_sample():
    scores, mask, _ = _entry_batch()
    penalty = torch.zeros_like(mask)
    penalty[0, 1] = 5.0  # sample 0 drifted far from the reference
    base, _ = compute_advantages("rloo", scores, mask, group_ids=ids(6, 3))
    pen, _ = compute_advantages("rloo", scores, mask, group_ids=ids(6, 3), kl_penalty=penalty)
    assert pen[0, 1] < base[0, 1] and pen[1, 2] > base[1, 2]


def test_gae_entry_needs_values():
    scores, mask, _ = _entry_batch()
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages("gae", scores, mask)


def test_unknown_estimator_suggests_the_closest_name():
    scores, mask, _ = _entry_batch()
    with pytest.raises(ValueError, match="unknown advantage estimator; did you mean 'rloo'"):
        compute_advantages("rlo", scores, mask, group_ids=ids(6, 3))


# ------------------------------------------------- grpo_batch_std: CONTRIBUTING.md's worked example
def test_grpo_batch_std_matches_loop():
    """Group mean, whole-batch std (Lite PPO); shuffled rows and unequal group sizes."""
    scores, group_ids = _shuffled_unequal_groups(seed=3)
    mask = torch.ones(len(scores), 4)
    adv, returns = compute_advantages("grpo_batch_std", scores, mask, group_ids=group_ids)
    centered = loop_group_advantages(scores.tolist(), group_ids.tolist(), "dr_grpo")  # 0 on equal groups
    values = [float(s) for s in scores]
    mean = sum(values) / len(values)
    batch_std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    expected = (centered / (batch_std + 1e-6)).float()
    torch.testing.assert_close(adv, expected.unsqueeze(1).expand(-1, 4))
    assert torch.equal(adv[group_ids == 1000], torch.zeros(3, 4))  # an all-equal group: exactly 0
    assert returns is None and ADVANTAGE_ESTIMATORS["grpo_batch_std"].needs_groups
