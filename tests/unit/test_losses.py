"""rlhf.algos.losses: loop references, closed forms, gradient signs, clipping, masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.algos.aggregation import compute_loss_normalizer
from rlhf.algos.losses import (
    bradley_terry_loss,
    compute_entropy,
    compute_entropy_from_logprobs,
    compute_policy_loss,
    compute_sequence_logprobs,
    compute_token_logprobs,
    compute_value_loss,
    dpo_loss,
    reward_model_loss,
    sft_loss,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


MASK = torch.tensor([[0.0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])


# --- token log-probs and SFT -----------------------------------------------------------------


def test_token_logprobs_match_loop_and_are_shifted():
    logits = torch.randn(2, 6, 11, generator=gen(0))
    tokens = torch.randint(0, 11, (2, 6), generator=gen(1))
    got = compute_token_logprobs(logits, tokens)
    assert got.shape == (2, 6) and torch.all(got[:, 0] == 0)
    for b in range(2):
        for t in range(1, 6):  # logits at t - 1 predict token t
            expected = torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]].item()
            assert got[b, t].item() == pytest.approx(expected, abs=1e-5)
    hot = compute_token_logprobs(logits, tokens, temperature=0.5)
    expected = torch.log_softmax(logits[0, 0] / 0.5, -1)[tokens[0, 1]].item()
    assert hot[0, 1].item() == pytest.approx(expected, abs=1e-5)


def test_sft_loss_equals_cross_entropy_on_response_tokens():
    logits = torch.randn(3, 5, 7, generator=gen(2))
    tokens = torch.randint(0, 7, (3, 5), generator=gen(3))
    mask = MASK.clone()
    mask[:, 0] = 0  # token 0 has no prediction; a response always follows a prompt
    loss = sft_loss(compute_token_logprobs(logits, tokens), mask)
    # Independent reference: the usual shift-and-ignore_index cross-entropy.
    labels = torch.where(mask[:, 1:].bool(), tokens[:, 1:], -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# --- policy loss -----------------------------------------------------------------------------


def loop_policy_loss(lp, old, adv, mask, lo, hi, dual):
    terms = []
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t] == 0:
                continue
            r, a = math.exp(lp[b, t] - old[b, t]), adv[b, t].item()
            loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            terms.append(loss)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("lo,hi,dual", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
def test_policy_loss_matches_loop(lo, hi, dual):
    lp, old = torch.randn(3, 5, generator=gen(4)) * 0.5, torch.randn(3, 5, generator=gen(5)) * 0.5
    adv = torch.randn(3, 5, generator=gen(6))
    loss, metrics = compute_policy_loss(lp, old, adv, MASK, lo, hi, dual)
    expected = loop_policy_loss(lp, old, adv, MASK, lo, hi, dual)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(metrics) >= {"clip_fraction", "approx_kl", "ratio_mean"}


def one_token_loss(ratio, adv, **kw):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    one = torch.ones(1, 1)
    loss, metrics = compute_policy_loss(lp, 0 * one, adv * one, one, **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), metrics


def test_policy_gradient_sign():
    # Descending the loss must raise the log-prob of positive-advantage tokens: grad < 0.
    _, grad_pos, _ = one_token_loss(1.0, 2.0)
    _, grad_neg, _ = one_token_loss(1.0, -2.0)
    assert grad_pos == pytest.approx(-2.0) and grad_neg == pytest.approx(2.0)


def test_clip_higher_asymmetry():
    loss, grad, m = one_token_loss(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and grad != 0 and m["clip_fraction"].item() == 0
    loss, grad, m = one_token_loss(1.25, 1.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0 and m["clip_fraction"].item() == 1
    # The lower bound uses clip_low: ratio 0.7 with a negative advantage is held at 0.8.
    loss, grad, _ = one_token_loss(0.7, -1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0
    loss, grad, _ = one_token_loss(0.7, -1.0, clip_low=0.4, clip_high=0.28)
    assert loss == pytest.approx(0.7) and grad != 0


def test_dual_clip_bounds_negative_advantages_only():
    loss, grad, m = one_token_loss(5.0, -1.0)
    assert loss == pytest.approx(5.0)
    loss, grad, m = one_token_loss(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0 and m["dual_clip_fraction"].item() == 1
    loss, _, _ = one_token_loss(5.0, 1.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.2)  # positive advantage: ordinary clip
    with pytest.raises(ValueError):
        one_token_loss(1.0, -1.0, dual_clip=0.5)


def test_policy_metrics_and_is_weights():
    lp = torch.randn(3, 5, generator=gen(7))
    loss, m = compute_policy_loss(lp, lp.clone(), torch.ones(3, 5), MASK)
    assert loss.item() == pytest.approx(-1.0)
    assert m["approx_kl"].item() == 0 and m["ratio_mean"].item() == pytest.approx(1.0)
    w = torch.tensor([[9.0, 2, 2, 2, 9], [2, 2, 2, 2, 2], [9, 9, 2, 9, 9]])
    loss_w, _ = compute_policy_loss(lp, lp.clone(), torch.ones(3, 5), MASK, is_weights=w)
    assert loss_w.item() == pytest.approx(-2.0)


def test_policy_loss_masked_positions_change_nothing():
    base = torch.randn(3, 5, generator=gen(8))
    old, adv = torch.randn(3, 5, generator=gen(9)) * 0.3, torch.randn(3, 5, generator=gen(10))
    nan = torch.full_like(base, float("nan"))
    out = []
    for poison in (False, True):
        lp = (torch.where(MASK.bool(), base, nan) if poison else base).clone().requires_grad_(True)
        o = torch.where(MASK.bool(), old, nan) if poison else old
        a = torch.where(MASK.bool(), adv, nan) if poison else adv
        loss, _ = compute_policy_loss(lp, o, a, MASK, dual_clip=3.0, agg_mode="seq_mean_token_mean")
        loss.backward()
        out.append((loss.detach(), lp.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert torch.all(out[1][1][~MASK.bool()] == 0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_policy_loss_gradient_accumulation_invariance(mode):
    mask = torch.tensor([[1.0, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    lp = (torch.randn(4, 4, generator=gen(11)) * 0.2).requires_grad_(True)
    old, adv = torch.zeros(4, 4), torch.randn(4, 4, generator=gen(12))
    full, _ = compute_policy_loss(lp, old, adv, mask, agg_mode=mode)
    (g_full,) = torch.autograd.grad(full, lp)
    norm = compute_loss_normalizer(mask, mode)
    acc = torch.zeros(4, 4)
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        micro, _ = compute_policy_loss(
            lp[rows], old[rows], adv[rows], mask[rows], agg_mode=mode, global_normalizer=norm
        )
        acc += torch.autograd.grad(micro, lp)[0]
    torch.testing.assert_close(acc, g_full)


# --- value loss ------------------------------------------------------------------------------


def test_value_loss_matches_loop_and_clips():
    v = (torch.randn(3, 5, generator=gen(13))).requires_grad_(True)
    old, ret = torch.randn(3, 5, generator=gen(14)), torch.randn(3, 5, generator=gen(15))
    loss, m = compute_value_loss(v, old, ret, MASK, clip_range=0.2)
    terms = []
    for b in range(3):
        for t in range(5):
            if MASK[b, t]:
                vc = old[b, t] + max(min(v[b, t] - old[b, t], 0.2), -0.2)
                terms.append(0.5 * max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2).item())
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert 0 <= m["clip_fraction"].item() <= 1


def test_value_loss_half_factor_and_clip_stops_gradient():
    one = torch.ones(1, 1)
    v = torch.tensor([[3.0]], requires_grad=True)
    loss, _ = compute_value_loss(v, 0 * one, one, one)
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and v.grad.item() == pytest.approx(2.0)  # V - R
    v = torch.tensor([[-0.5]], requires_grad=True)  # moved away from R=1 beyond the clip range
    loss, m = compute_value_loss(v, 0 * one, one, one, clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 1.5**2) and m["clip_fraction"].item() == 0
    v = torch.tensor([[0.5]], requires_grad=True)  # moved toward R beyond the clip range
    loss, m = compute_value_loss(v, 0 * one, one, one, clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and v.grad.item() == 0
    assert m["clip_fraction"].item() == 1


# --- entropy ---------------------------------------------------------------------------------


def test_entropy():
    logits = torch.randn(2, 3, 6, generator=gen(16))
    h = compute_entropy(logits)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t], -1).tolist()
            assert h[b, t].item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)
    torch.testing.assert_close(compute_entropy_from_logprobs(torch.log_softmax(logits, -1)), h)
    assert compute_entropy(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    sharp = compute_entropy(logits * 1e4)
    assert torch.isfinite(sharp).all() and sharp.max().item() < 1e-3


# --- DPO / IPO -------------------------------------------------------------------------------


def test_dpo_equals_log2_when_policy_is_reference():
    pc, pr = torch.randn(4, generator=gen(17)), torch.randn(4, generator=gen(18))
    for ls in (0.0, 0.1):
        losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=ls)
        torch.testing.assert_close(losses, torch.full((4,), math.log(2)))
        assert torch.all(cr == 0) and torch.all(rr == 0)
    ipo, _, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.full((4,), (1 / 0.2) ** 2))


def test_dpo_matches_formula_and_gradient_sign():
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    for i in range(2):
        z = 0.5 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        sig = lambda x: 1 / (1 + math.exp(-x))
        expected = -0.8 * math.log(sig(z)) - 0.2 * math.log(sig(-z))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(cr, 0.5 * (pc - rc).detach())
    torch.testing.assert_close(rr_, 0.5 * (pr - rr).detach())
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].sum().backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # raise chosen, lower rejected


def test_ipo_formula():
    t = torch.tensor
    losses, _, _ = dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.25, loss_type="ipo")
    assert losses.item() == pytest.approx((1.0 - 2.0) ** 2)


def loop_sequence_logprobs(token_logprobs, mask, reduction):
    out = []
    for row, m in zip(token_logprobs.tolist(), mask.tolist()):
        picked = [x for x, keep in zip(row, m) if keep]
        total = sum(picked)
        out.append(total / len(picked) if reduction == "mean" and picked else total)
    return torch.tensor(out)


def test_sequence_logprobs_match_loop_and_ignore_padding():
    lp = -torch.rand(3, 5, generator=gen(30)) * 4
    lp[0, 0] = float("nan")  # padding / prompt positions never leak in, even as NaN
    for reduction in ("sum", "mean"):
        got = compute_sequence_logprobs(lp, MASK, reduction)
        torch.testing.assert_close(got, loop_sequence_logprobs(lp, MASK, reduction))
    assert compute_sequence_logprobs(lp, torch.zeros(3, 5), "mean").eq(0).all()  # empty rows give 0, not NaN
    with pytest.raises(ValueError, match="reduction"):
        compute_sequence_logprobs(lp, MASK, "max")


def test_ipo_on_averaged_logprobs_has_the_same_target_at_every_length():
    """IPO's target margin 1/(2 beta) is per token: the same per-token log-ratio gives the same
    loss for a 2-token and a 40-token pair when averaged (the default), not when summed."""
    beta, per_token = 0.5, 0.25  # chosen up by 0.25 nats per token, rejected unchanged
    losses = {}
    for reduction in ("mean", "sum"):
        for length in (2, 40):
            policy, ref, mask = torch.full((2, length), -1.0), torch.full((2, length), -1.0), torch.ones(2, length)
            policy[0] += per_token
            seq, ref_seq = (compute_sequence_logprobs(x, mask, reduction) for x in (policy, ref))
            losses[reduction, length] = dpo_loss(seq[0:1], seq[1:2], ref_seq[0:1], ref_seq[1:2], beta, "ipo")[0].item()
    assert losses["mean", 2] == pytest.approx(losses["mean", 40]) == pytest.approx((per_token - 1 / (2 * beta)) ** 2)
    assert losses["sum", 2] == pytest.approx((2 * per_token - 1) ** 2)
    assert losses["sum", 40] == pytest.approx((40 * per_token - 1) ** 2)


def test_dpo_config_feeds_ipo_averaged_logprobs_by_default():
    from rlhf.config import DPOConfig

    assert DPOConfig(loss_type="ipo").logprob_reduction == "mean"
    assert DPOConfig(loss_type="ipo", ipo_logprobs="sum").logprob_reduction == "sum"
    assert DPOConfig().logprob_reduction == DPOConfig(ipo_logprobs="mean").logprob_reduction == "sum"  # DPO sums


# --- reward model ----------------------------------------------------------------------------


def test_bradley_terry():
    c = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    r = torch.tensor([0.0, 0.0, 3.0])
    losses = bradley_terry_loss(c, r)
    expected = [math.log1p(math.exp(-(a - b))) for a, b in zip([1.0, 0.0, 2.0], [0.0, 0.0, 3.0])]
    torch.testing.assert_close(losses, torch.tensor(expected))
    assert losses[1].item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert torch.all(c.grad < 0)  # descending raises the chosen score
    with_margin = bradley_terry_loss(c, r, margin=torch.tensor([1.0, 0.0, 0.0]))
    assert with_margin[0].item() == pytest.approx(math.log(2))


def test_reward_model_loss_adds_masked_lm_nll():
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-3.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bt = bradley_terry_loss(c, r).mean().item()
    assert reward_model_loss(c, r).item() == pytest.approx(bt)
    got = reward_model_loss(c, r, lm_logprobs_chosen=lp, lm_mask=mask, lm_coef=0.5)
    assert got.item() == pytest.approx(bt + 0.5 * (1 + 2 + 3) / 3)
