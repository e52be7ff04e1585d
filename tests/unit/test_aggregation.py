"""rlhf.algos.aggregation: loop references, masking, empty masks, gradient accumulation."""

import pytest
import torch

from rlhf.algos.aggregation import (
    AGG_MODES,
    aggregate_loss,
    compute_loss_normalizer,
    masked_mean,
    masked_sum,
    masked_whiten,
)


def ragged_mask(B, T, seed, empty_rows=()):
    """Left padding (prompt), a response of random length, right padding; some rows empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):
        start = int(torch.randint(0, T // 2, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        if b not in empty_rows:
            mask[b, start : start + length] = 1
    return mask


def loop_aggregate(values, mask, mode, constant=None):
    """Straightforward reference over Python lists."""
    B, T = values.shape
    seqs = [[values[b, t].item() for t in range(T) if mask[b, t] > 0] for b in range(B)]
    nonempty = [s for s in seqs if s]
    total = sum(sum(s) for s in seqs)
    if mode == "token_mean":
        return total / sum(len(s) for s in seqs)
    if mode == "seq_mean_token_mean":
        return sum(sum(s) / len(s) for s in nonempty) / len(nonempty)
    if mode == "seq_mean_token_sum":
        return sum(sum(s) for s in nonempty) / len(nonempty)
    return total / (constant if constant is not None else B * T)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_loop(mode):
    values = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    mask = ragged_mask(6, 9, seed=1, empty_rows=(2,))
    got = aggregate_loss(values, mask, mode)
    assert got.item() == pytest.approx(loop_aggregate(values, mask, mode), rel=1e-5)


def test_token_sum_norm_uses_constant():
    values, mask = torch.randn(4, 5), ragged_mask(4, 5, seed=2)
    got = aggregate_loss(values, mask, "token_sum_norm", constant_normalizer=64)
    assert got.item() == pytest.approx(loop_aggregate(values, mask, "token_sum_norm", 64), rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_masked_positions_change_nothing(mode):
    mask = ragged_mask(5, 8, seed=3, empty_rows=(4,))
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    poisoned = torch.where(mask.bool(), base, torch.full_like(base, float("nan")))
    grads = []
    for v in (base, poisoned):
        v = v.clone().requires_grad_(True)
        loss = aggregate_loss(v, mask, mode)
        loss.backward()
        grads.append((loss.detach(), v.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert torch.all(grads[1][1][~mask.bool()] == 0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_mask_gives_zero_not_nan(mode):
    v = torch.randn(3, 4, requires_grad=True)
    loss = aggregate_loss(v, torch.zeros(3, 4), mode)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(v.grad == 0)
    assert masked_mean(v, torch.zeros(3, 4)).item() == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("n_micro", [8, 2, 1])
def test_gradient_accumulation_invariance(mode, n_micro):
    """Summing micro-batch losses that divide by the full batch's normaliser reproduces the
    full-batch loss and gradient, for 8 x 1, 2 x 4 and 1 x 8 splits."""
    B, T = 8, 7
    mask = ragged_mask(B, T, seed=5, empty_rows=(3,))
    w = torch.randn(T, requires_grad=True)  # a shared parameter, as in a model
    x = torch.randn(B, T, generator=torch.Generator().manual_seed(6))

    full = aggregate_loss((x * w) ** 2, mask, mode)
    (full_grad,) = torch.autograd.grad(full, w)

    norm = compute_loss_normalizer(mask, mode)
    total, acc = 0.0, torch.zeros(T)
    for xs, ms in zip(x.chunk(n_micro), mask.chunk(n_micro)):
        micro = aggregate_loss((xs * w) ** 2, ms, mode, global_normalizer=norm)
        acc += torch.autograd.grad(micro, w)[0]
        total += micro.item()
    assert total == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(acc, full_grad)


def test_token_mean_without_global_normalizer_is_not_invariant():
    """Guards the test above: with local denominators, micro-batches of unequal token counts
    weigh tokens differently, so the (averaged) micro losses differ from the full loss."""
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    x = torch.tensor([[1.0, 1, 1, 1], [5, 0, 0, 0]])
    full = aggregate_loss(x, mask, "token_mean")  # 9 / 5
    micro_mean = sum(aggregate_loss(a, m, "token_mean") for a, m in zip(x, mask)) / 2  # (1 + 5)/2
    assert full.item() == pytest.approx(1.8) and micro_mean.item() == pytest.approx(3.0)


def test_masked_sum_and_mean_along_dim():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 0.0]))
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_masked_whiten():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)) * 3 + 2
    mask = ragged_mask(4, 6, seed=8)
    vals = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    w = masked_whiten(x, mask)
    expected = torch.where(mask.bool(), (x - mean) / std, 0.0)
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-5)
    assert torch.all(w[~mask.bool()] == 0)
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept_mean, mask).item() == pytest.approx(mean, rel=1e-4)
