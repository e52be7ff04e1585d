"""Masked reductions and loss aggregation over (B, T) token tensors.

Every tensor here is (B, T): B sequences, T token positions. A mask is a 0/1 tensor (bool or
float) of the same shape with 1 on the tokens that count (usually response tokens). Values at
masked positions are never read: they are replaced by 0 with `torch.where` before any
arithmetic, so padding may hold anything (even NaN or inf) without changing a result or a
gradient.

Gradient accumulation
---------------------
A step's batch is often split into micro-batches whose gradients are summed. Summing the
micro-batch losses reproduces the full-batch loss only if every micro-batch divides by the
*full batch's* denominator. `compute_loss_normalizer(full_mask, mode)` returns that denominator;
pass it as `global_normalizer` to `aggregate_loss` for every micro-batch. Then, for every
mode, sum(micro losses) == full-batch loss, and so are the gradients. (Across data-parallel
ranks that average gradients, also multiply the loss by the world size, or compute the
normaliser over all ranks' masks and sum rather than average.)

Without a global normaliser:
- "token_mean" is not invariant: micro-batches with different token counts get different
  per-token weights.
- "seq_mean_token_mean" / "seq_mean_token_sum" are invariant only when every micro-batch
  holds the same number of non-empty sequences, and then it is the *mean* of the micro-batch
  losses that equals the full-batch loss.
- "token_sum_norm" is invariant (losses sum) when `constant_normalizer` is the full batch's
  constant, since its denominator does not depend on the micro-batch.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is 1, over all elements or along `dim`."""
    zeroed = torch.where(mask.bool(), x, torch.zeros_like(x))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over masked positions. An empty mask gives 0 (not NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to zero mean, unit variance over the masked positions of the whole tensor.

    Uses the population variance (divide by N). With `shift_mean=False` the mean is added back,
    i.e. only the scale changes. Masked positions are 0 in the output.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def compute_loss_normalizer(mask: torch.Tensor, mode: str, constant_normalizer: float | None = None) -> torch.Tensor:
    """The denominator `aggregate_loss` uses for this mask and mode, as a float scalar tensor.

    Compute it once on the full batch's mask (B, T) and pass it as `global_normalizer` to each
    micro-batch's `aggregate_loss` to make gradient accumulation exact.
      token_mean          -> number of masked tokens
      seq_mean_*          -> number of sequences with at least one masked token
      token_sum_norm      -> `constant_normalizer`, default B * T (padded length x sequences)
    Clamped to >= 1 so an empty mask yields a loss of 0, not NaN.
    """
    m = mask.bool()
    if mode == "token_mean":
        n = m.sum()
    elif mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        n = m.any(dim=-1).sum()
    elif mode == "token_sum_norm":
        n = torch.tensor(float(m.numel() if constant_normalizer is None else constant_normalizer))
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")
    return n.to(torch.float32).clamp(min=1.0)


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    constant_normalizer: float | None = None,
    global_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses `values` (B, T) to a scalar.

    Modes:
      "token_mean"          sum over all masked tokens / number of masked tokens. Every token
                            weighs the same, so long sequences dominate (DAPO's choice).
      "seq_mean_token_mean" mean over sequences of each sequence's token mean (original GRPO).
                            Sequences with no masked token are left out of the mean.
      "seq_mean_token_sum"  mean over (non-empty) sequences of each sequence's token sum.
      "token_sum_norm"      Dr. GRPO: sum over all masked tokens / `constant_normalizer`, a
                            constant independent of the sampled lengths, typically
                            max_response_length x number_of_sequences (default B * T, i.e. the
                            padded length times the number of rows). Removes the length bias of
                            the per-sequence mean.

    `global_normalizer`, when given, replaces the denominator (see the module docstring: pass
    `compute_loss_normalizer(full_batch_mask, mode)` to make micro-batch losses sum to the
    full-batch loss). For the seq_* modes the numerator is the sum of per-sequence terms.
    """
    m = mask.bool()
    if mode == "token_mean" or mode == "token_sum_norm":
        numerator = masked_sum(values, m)
    elif mode == "seq_mean_token_mean":
        per_seq = masked_sum(values, m, dim=-1) / m.sum(dim=-1).clamp(min=1)  # (B,)
        numerator = per_seq.sum()  # empty sequences contribute 0 and are not counted below
    elif mode == "seq_mean_token_sum":
        numerator = masked_sum(values, m, dim=-1).sum()
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")

    if global_normalizer is None:
        denominator = compute_loss_normalizer(m, mode, constant_normalizer)
    else:
        denominator = torch.as_tensor(global_normalizer, dtype=torch.float32)
    return numerator / denominator.to(numerator.device, numerator.dtype)
