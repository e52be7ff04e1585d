"""Truncated importance sampling (TIS) for the rollout-engine / trainer mismatch.

The rollout engine (vLLM: other kernels, other precision, sometimes stale weights) samples from
a distribution pi_rollout that differs slightly from the trainer's pi_old for the *same*
weights. PPO's ratio is computed against the trainer's pi_old, so the batch is off-policy by
pi_old / pi_rollout. Multiplying each token's loss by that ratio, truncated at `cap`, corrects
the bias while bounding the variance (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training").
"""

from __future__ import annotations

import math

import torch

from rlhf.algos.aggregation import masked_mean, masked_sum


@torch.no_grad()
def compute_truncated_is_weights(
    trainer_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights min(pi_trainer / pi_rollout, cap), detached. Returns (weights, metrics).

    trainer_logprobs (B, T): the trainer's log-probs of the sampled tokens (pi_old, before the
    update); rollout_logprobs (B, T): the ones the rollout engine reported; mask (B, T).
    level "token": one weight per token. "sequence": the product of the token ratios of each
    sequence (exp of the summed log-ratio), truncated, shared by all its tokens; unbiased for
    sequence-level objectives but higher variance.
    weights (B, T) are 0 at masked positions (they only ever multiply a masked loss).

    metrics (scalars): mean_abs_logprob_diff, kl_k3 (k3 estimate of KL(rollout || trainer) from
    the rollout's samples, >= 0), truncated_fraction (of tokens, or of sequences at "sequence").
    """
    m = mask.bool()
    log_ratio = torch.where(m, trainer_logprobs - rollout_logprobs, 0.0).float()  # (B, T)
    log_cap = math.log(cap)
    if level == "token":
        log_w = log_ratio  # (B, T)
        truncated_fraction = masked_mean((log_w > log_cap).float(), m)
    elif level == "sequence":
        log_w_seq = masked_sum(log_ratio, m, dim=-1)  # (B,)
        log_w = log_w_seq.unsqueeze(-1).expand_as(log_ratio)  # (B, T)
        has_tokens = m.any(dim=-1)
        truncated_fraction = masked_mean((log_w_seq > log_cap).float(), has_tokens)
    else:
        raise ValueError(f"unknown importance-sampling level {level!r}; choose token|sequence")
    # Truncate in log space: exp of a long sequence's summed log-ratio would overflow.
    weights = torch.where(m, torch.exp(log_w.clamp(max=log_cap)), 0.0)

    clamped = log_ratio.clamp(-20.0, 20.0)
    metrics = {
        "mean_abs_logprob_diff": masked_mean(log_ratio.abs(), m),
        "kl_k3": masked_mean(torch.exp(clamped) - 1.0 - clamped, m),
        "truncated_fraction": truncated_fraction,
    }
    return weights, metrics
