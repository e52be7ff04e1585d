"""rlhf.algos.importance: truncated importance-sampling weights."""

import math

import pytest
import torch

from rlhf.algos.importance import compute_truncated_is_weights

MASK = torch.tensor([[0.0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


def rand(seed):
    return -torch.rand(3, 4, generator=torch.Generator().manual_seed(seed)) * 2


def test_weights_are_one_when_logprobs_agree():
    lp = rand(0)
    w, m = compute_truncated_is_weights(lp, lp.clone(), MASK)
    torch.testing.assert_close(w, MASK)
    assert m["mean_abs_logprob_diff"].item() == 0 and m["kl_k3"].item() == 0
    assert m["truncated_fraction"].item() == 0


def test_token_level_matches_loop_and_caps():
    trainer, rollout = rand(1), rand(2)
    w, m = compute_truncated_is_weights(trainer, rollout, MASK, cap=1.5)
    n_trunc, n = 0, 0
    for b in range(3):
        for t in range(4):
            if not MASK[b, t]:
                assert w[b, t].item() == 0
                continue
            raw = math.exp(trainer[b, t].item() - rollout[b, t].item())  # pi_trainer / pi_rollout
            assert w[b, t].item() == pytest.approx(min(raw, 1.5), rel=1e-5)
            n_trunc, n = n_trunc + (raw > 1.5), n + 1
    assert w.max().item() <= 1.5
    assert m["truncated_fraction"].item() == pytest.approx(n_trunc / n)
    assert m["kl_k3"].item() >= 0


def test_sequence_level_is_capped_product_of_ratios():
    trainer, rollout = rand(3), rand(4)
    w, _m = compute_truncated_is_weights(trainer, rollout, MASK, cap=2.0, level="sequence")
    for b in range(2):
        log_w = sum(trainer[b, t].item() - rollout[b, t].item() for t in range(4) if MASK[b, t])
        expected = min(math.exp(log_w), 2.0)
        torch.testing.assert_close(w[b], MASK[b] * expected)
    assert torch.all(w[2] == 0)
    # A huge summed log-ratio truncates instead of overflowing.
    w_big, m_big = compute_truncated_is_weights(rollout + 50, rollout, MASK, level="sequence")
    torch.testing.assert_close(w_big, MASK * 2.0)
    assert m_big["truncated_fraction"].item() == 1.0  # both non-empty sequences


def test_weights_are_detached_and_ignore_padding():
    trainer = rand(5).requires_grad_(True)
    rollout = rand(6)
    w, _ = compute_truncated_is_weights(trainer, rollout, MASK)
    assert not w.requires_grad
    nan = torch.full_like(rollout, float("nan"))
    w2, m2 = compute_truncated_is_weights(
        torch.where(MASK.bool(), trainer.detach(), nan),
        torch.where(MASK.bool(), rollout, nan),
        MASK,
    )
    torch.testing.assert_close(w, w2)
    assert all(torch.isfinite(v) for v in m2.values())


def test_rejects_unknown_level():
    with pytest.raises(ValueError):
        compute_truncated_is_weights(rand(0), rand(1), MASK, level="batch")
