"""Losses: PPO policy (clip, clip-higher, dual clip), clipped value, entropy, DPO / IPO,
Bradley-Terry reward model, SFT; and the token log-prob gather they all start from.

Shapes: B sequences, T token positions, V vocabulary. Token tensors are (B, T) with a 0/1
mask (B, T), 1 on tokens that count. Per-token losses are reduced by `aggregate_loss`
(`agg_mode`, `global_normalizer`: see aggregation.py for gradient-accumulation invariance).
Inputs at masked positions are replaced by 0 before any arithmetic, so padding never leaks
into a loss or a gradient.

`POLICY_LOSSES` maps the config's algorithm.policy_loss to one `@policy_loss` function with the
signature of `PolicyLossFn`; the PPO clipped surrogate is "ppo".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhf.algos.aggregation import aggregate_loss, masked_mean
from rlhf.registry import Entry, Registry, summary_of

Normalizer = float | torch.Tensor | None


class PolicyLossFn(Protocol):
    """A policy loss: token tensors (B, T) in, (scalar loss to minimise, detached scalar metrics) out."""

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        is_weights: torch.Tensor | None = None,
        agg_mode: str = "token_mean",
        global_normalizer: Normalizer = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class PolicyLoss(Entry):
    fn: PolicyLossFn


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register the decorated function as the policy loss `name` (algorithm.policy_loss)."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES.add(PolicyLoss(name, summary_of(fn), fn))
        return fn

    return register


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def compute_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token given the tokens before it, aligned with `tokens`: (B, T).

    logits (B, T, V) are the model's *unshifted* outputs for input `tokens` (B, T): logits at
    position t predict token t + 1. So out[:, t] = log p(tokens[:, t] | tokens[:, :t]) for
    t >= 1, and out[:, 0] = 0 (nothing predicts the first token, so a loss mask must be 0
    there; it always is, since a response follows a prompt). Because the result lines up with
    `tokens`, the same response mask (1 on response tokens) selects it.

    `temperature` divides the logits, to match log-probs reported by a sampler at that
    temperature. Computed as gathered logit minus logsumexp, which never materialises the
    (B, T, V) log-softmax; done in float32 for bf16 inputs.
    """
    shifted = logits[:, :-1].float() / temperature  # (B, T-1, V) predicts tokens[:, 1:]
    targets = tokens[:, 1:].long()  # (B, T-1)
    picked = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logprobs = picked - torch.logsumexp(shifted, dim=-1)  # (B, T-1)
    return F.pad(logprobs, (1, 0), value=0.0)  # (B, T)


@policy_loss("ppo")
def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    is_weights: torch.Tensor | None = None,
    agg_mode: str = "token_mean",
    global_normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), with clip-higher and dual clip.

    To minimise. Returns (loss, metrics).

    logprobs (B, T) under the current policy (with grad); old_logprobs (B, T) from the policy
    that generated the batch; advantages (B, T). With ratio = exp(logprobs - old_logprobs):
        loss_t = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    clip_high > clip_low is DAPO's clip-higher: room for low-probability tokens to rise.
    dual_clip = c > 1 (Ye et al. 2020) bounds the loss of negative-advantage tokens at -A * c,
    so a token whose ratio exploded cannot dominate the update.
    is_weights (B, T), detached: truncated importance weights for rollout/trainer mismatch
    (importance.py); they multiply the per-token loss.

    metrics (detached scalars): clip_fraction (tokens where the clipped term is the active
    one), dual_clip_fraction, approx_kl (k3 estimate of KL(old || new)), ratio_mean.
    """
    m = mask.bool()
    advantages = _zero_masked(advantages, m).detach()
    # Clamp the log-ratio so exp cannot overflow on a wildly off-policy token.
    log_ratio = _zero_masked(logprobs - old_logprobs.detach(), m).clamp(-20.0, 20.0)  # (B, T)
    ratio = torch.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights, m).detach()

    loss = aggregate_loss(per_token, m, agg_mode, global_normalizer=global_normalizer)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), m),
            "dual_clip_fraction": masked_mean(dual_active.float(), m),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, metrics


def compute_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
    agg_mode: str = "token_mean",
    global_normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss 0.5 * (V - R)^2, optionally clipped around the rollout-time values.

    values (B, T) current critic (with grad), old_values (B, T) at rollout time, returns (B, T)
    targets (e.g. from GAE). With clip_range eps, V_clip = old + clip(V - old, -eps, eps) and the
    per-token loss is 0.5 * max((V - R)^2, (V_clip - R)^2) (PPO2 baselines): the pessimistic
    choice stops the critic from moving far from its old estimate in one update. The 0.5 makes
    the gradient (V - R). Returns (loss, metrics: clip_fraction, value_mean).
    """
    m = mask.bool()
    values = _zero_masked(values, m)
    old_values = _zero_masked(old_values, m).detach()
    returns = _zero_masked(returns, m).detach()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, clip_active = unclipped, torch.zeros_like(m)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns) ** 2
        per_token, clip_active = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(per_token, m, agg_mode, global_normalizer=global_normalizer)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean(clip_active.float(), m),
            "value_mean": masked_mean(values, m),
        }
    return loss, metrics


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis: (B, T, V) -> (B, T).

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, stable for large logits (no log of tiny p).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def compute_entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy from full-vocabulary log-probs: (B, T, V) -> (B, T), H = -sum p log p."""
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def compute_sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Log-prob of each whole response from its token log-probs: (B, T) -> (B,).

    "sum":  log pi(y) = sum_t log pi(y_t), what DPO's implicit reward is defined on.
    "mean": the sum divided by the response's token count (the mask's row sum), the
            length-averaged log-prob IPO is defined on. A row with no tokens gives 0.
    """
    m = mask.bool()
    total = _zero_masked(token_logprobs, m).sum(-1)  # (B,)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / m.sum(-1).clamp(min=1)
    raise ValueError(f"unknown sequence log-prob reduction {reduction!r}; choose 'sum' or 'mean'")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al. 2023). All inputs (B,) -> three (B,).

    Inputs are sequence log-probs of each whole response (`compute_sequence_logprobs`). With
        logits = (pi_c - ref_c) - (pi_r - ref_r)
    "sigmoid": -(1 - ls) * log sigmoid(beta * logits) - ls * log sigmoid(-beta * logits), on
               summed log-probs. label_smoothing ls > 0 is conservative DPO (cDPO): labels
               flipped w.p. ls.
    "ipo":     (logits - 1 / (2 * beta))^2 (Azar et al. 2023), on length-averaged log-probs
               (reduction "mean") as in the paper and TRL: on sums, the target margin 1 / (2 beta)
               would ask for a different per-token change at every response length.
    Returns (losses, chosen_rewards, rejected_rewards); rewards = beta * (pi - ref), detached,
    for logging (reward accuracy = chosen > rejected). Take losses.mean() to train.
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - (
            label_smoothing * F.logsigmoid(-beta * logits)
        )
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose 'sigmoid' or 'ipo'")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise reward-model loss -log sigmoid(s_c - s_r - margin), per pair: (B,) -> (B,).

    `margin` (B,), optional, demands the chosen score lead by at least that much (Llama 2).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_model_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    lm_logprobs_chosen: torch.Tensor | None = None,
    lm_mask: torch.Tensor | None = None,
    lm_coef: float = 0.0,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward-model training loss (scalar): mean Bradley-Terry loss over pairs, plus optionally
    lm_coef * token-mean NLL of the chosen responses (lm_logprobs_chosen (B, T) on lm_mask
    (B, T)), an InstructGPT-style regulariser keeping the backbone a language model.
    """
    loss = bradley_terry_loss(chosen_scores, rejected_scores, margin).mean()
    if lm_coef and lm_logprobs_chosen is not None:
        if lm_mask is None:
            lm_mask = torch.ones_like(lm_logprobs_chosen, dtype=torch.bool)
        loss = loss + lm_coef * aggregate_loss(-lm_logprobs_chosen, lm_mask, "token_mean")
    return loss


def sft_loss(
    token_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    agg_mode: str = "token_mean",
    global_normalizer: Normalizer = None,
) -> torch.Tensor:
    """Next-token cross-entropy on response tokens -> scalar.

    token_logprobs (B, T) from `compute_token_logprobs(logits, tokens)`, aligned with tokens
    (already shifted there), and loss_mask (B, T) 1 on the response tokens to learn.
    """
    return aggregate_loss(-token_logprobs, loss_mask, agg_mode, global_normalizer=global_normalizer)
