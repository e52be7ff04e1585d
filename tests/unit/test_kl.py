"""rlhf.algos.kl: estimator formulas and signs, penalty, KL loss, controllers."""

import math

import pytest
import torch

from rlhf.algos.aggregation import aggregate_loss
from rlhf.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    compute_kl,
    kl_loss,
)


def test_estimators_match_formulas():
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
    k1, k2, k3 = (compute_kl(lp, ref, e) for e in ("k1", "k2", "k3"))
    for b in range(3):
        for t in range(5):
            log_r = ref[b, t].item() - lp[b, t].item()  # r = pi_ref / pi
            assert k1[b, t].item() == pytest.approx(-log_r, abs=1e-6)
            assert k2[b, t].item() == pytest.approx(0.5 * log_r**2, abs=1e-6)
            assert k3[b, t].item() == pytest.approx(math.exp(log_r) - 1 - log_r, abs=1e-5)
    assert torch.all(k2 >= 0) and torch.all(k3 >= 0)
    with pytest.raises(ValueError, match="unknown KL estimator; known: k1, k2, k3"):
        compute_kl(lp, ref, "k4")


def test_estimators_are_unbiased_for_sampled_tokens():
    """Sample tokens from pi; mean k1 and k3 estimate KL(pi || pi_ref) (> 0). A flipped sign
    would make k1's mean negative, and KL(ref || pi) differs here."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.2, 0.2, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum().item()
    reverse_kl = (q * (q / p).log()).sum().item()
    assert abs(true_kl - reverse_kl) > 0.05
    y = torch.multinomial(p, 200_000, replacement=True, generator=g).view(1, -1)
    lp, ref = p.log()[y], q.log()[y]
    for est in ("k1", "k3"):
        assert compute_kl(lp, ref, est).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_mask_zeroes_and_ignores_padding():
    lp, ref = torch.tensor([[-1.0, float("nan")]]), torch.tensor([[-2.0, 3.0]])
    kl = compute_kl(lp, ref, "k3", mask=torch.tensor([[1, 0]]))
    assert kl[0, 1].item() == 0.0 and kl[0, 0].item() == pytest.approx(math.exp(-1) - 1 + 1)


def loop_k3_and_grad(log_r: float) -> tuple[float, float]:
    """k3 = e^x - 1 - x at x = log r = ref - logp, and its derivative in logp: 1 - e^x."""
    return math.exp(log_r) - 1 - log_r, 1 - math.exp(log_r)


def test_k3_value_and_gradient_match_loop_far_from_the_reference():
    """The policy far above the reference (log r = -30) is where the penalty matters most:
    the gradient must be ~1 per token (a clamp at -20 made it 0 and the value 19 instead of 29)."""
    log_rs = [-80.0, -30.0, -20.5, -5.0, -0.3, 0.0, 0.7, 5.0, 15.0, 19.9]
    lp = torch.full((1, len(log_rs)), -2.0, requires_grad=True)
    ref = lp.detach() + torch.tensor([log_rs])
    kl = compute_kl(lp, ref, "k3")
    kl.sum().backward()
    for i, x in enumerate(log_rs):
        value, grad = loop_k3_and_grad(x)
        assert kl[0, i].item() == pytest.approx(value, rel=1e-5, abs=1e-5), x
        assert lp.grad[0, i].item() == pytest.approx(grad, rel=1e-4, abs=1e-5), x
    assert lp.grad[0, 1].item() == pytest.approx(1.0)  # log r = -30


def test_k3_cannot_overflow_and_keeps_its_gradient_sign_above_the_cap():
    """Far below the reference (log r >> 0) exp would overflow float32 (log r > 88); beyond the
    cap k3 grows linearly instead, stays finite and >= 0, and still pushes the log-prob up."""
    log_rs = torch.tensor([[20.5, 30.0, 100.0, 1000.0]])
    lp = torch.zeros_like(log_rs, requires_grad=True)
    kl = compute_kl(lp, log_rs, "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and (kl > 0).all() and torch.isfinite(lp.grad).all()
    assert (lp.grad < -1e8).all()  # analytically 1 - e^(log r): large and negative
    assert (kl.diff() > 0).all()  # still increasing in log r
    for x in (19.9, 20.0, 20.1):  # value and gradient continuous at the cap
        p = torch.zeros(1, 1, requires_grad=True)
        k = compute_kl(p, torch.tensor([[x]]), "k3")
        k.sum().backward()
        value, grad = loop_k3_and_grad(x)
        assert k.item() == pytest.approx(value, rel=1e-2) and p.grad.item() == pytest.approx(grad, rel=0.11)


def test_apply_kl_penalty():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = apply_kl_penalty(rewards, kl, 0.5, mask)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))
    assert not out.requires_grad  # KL-in-reward is part of the environment


def test_kl_loss_is_aggregated_kl_with_gradient():
    lp = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    kl = compute_kl(lp, torch.zeros(2, 4), "k3", mask)
    loss = kl_loss(kl, mask, "seq_mean_token_mean")
    assert loss.item() == pytest.approx(aggregate_loss(kl, mask, "seq_mean_token_mean").item())
    loss.backward()
    assert torch.all(lp.grad[~mask.bool()] == 0) and lp.grad[mask.bool()].abs().sum() > 0


def test_adaptive_controller():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl2 = AdaptiveKLController(0.1, 6.0, 100)
    ctl2.update(current_kl=6.6, n_steps=10)  # error 0.1, unclipped
    assert ctl2.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    ctl3 = AdaptiveKLController(0.1, 6.0, 100)
    ctl3.update(current_kl=1.0, n_steps=10)  # below target -> coefficient falls
    assert ctl3.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))

    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
