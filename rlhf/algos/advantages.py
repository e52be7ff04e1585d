"""Advantage estimators: GAE (PPO), GRPO / Dr. GRPO, RLOO, REINFORCE++ (and its baseline form).

Shapes: B sequences, T token positions. Token-level tensors are (B, T) and come with a 0/1
mask (B, T) that is 1 on response tokens. Sequence-level scores are (B,). For the group
estimators the n samples of one prompt are contiguous: rows [0, n) are prompt 0, [n, 2n)
prompt 1, and so on, so the group structure is just `group_size`.

Advantages are targets, never differentiated through: every function runs under no_grad.
Masked positions (left padding, prompt tokens, right padding) are skipped by the recursions:
the next valid token is the "next state", and nothing after the last valid token is
bootstrapped (its value is 0). Outputs are 0 at masked positions.

Group statistics (mean, std, leave-one-out baselines) are computed in float64, and a group whose
scores are equal up to `EQUAL_SCORE_TOL` gets advantage 0 exactly (`equal_score_groups`, the
same rule dynamic sampling uses to drop groups). In float32, eight copies of 0.3 have a mean that
differs from 0.3 and a std of ~1e-8; divided by std + eps that rounding noise became an
advantage of 0.03 (0.32 for 6.46): a signal where there is none.
"""

from __future__ import annotations

import torch

from rlhf.algos.aggregation import masked_whiten

# Scores that differ by at most this fraction of max(1, the group's largest |score|) are equal:
# a few float32 rounding steps (float32 resolves ~6e-8 relative), far below any real reward gap.
EQUAL_SCORE_TOL = 1e-6


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


@torch.no_grad()
def compute_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar score (B,) on its last valid token -> (B, T).

    This is the usual way an outcome reward enters token-level estimators (GAE, REINFORCE++);
    a per-token KL penalty is then added with `kl.apply_kl_penalty`. A row with an empty mask
    gets no reward.
    """
    m = mask.bool()
    T = m.shape[-1]
    positions = torch.arange(T, device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, positions, -1).max(dim=-1).values  # (B,) index of last valid token
    is_last = (positions == last.unsqueeze(-1)) & m  # (B, T)
    return torch.where(is_last, scores.unsqueeze(-1).to(torch.float32), 0.0)


@torch.no_grad()
def compute_gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over valid tokens.

    rewards (B, T): token-level rewards (score on the last response token, minus per-token KL).
    values  (B, T): critic values V(s_t) for the state before emitting token t.
    Returns (advantages, returns), both (B, T), 0 at masked positions;
    returns = advantages + values is the critic's regression target.

        delta_t = r_t + gamma * V(next valid t') - V(t)          (V after the last token = 0)
        A_t     = delta_t + gamma * lam * A_{next valid t'}
    """
    m = mask.bool()
    rewards = _zero_masked(rewards, m).float()
    values = _zero_masked(values, m).float()
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,) V of the next valid token, 0 past the end
    next_adv = rewards.new_zeros(B)  # (B,) A of the next valid token
    advantages = [None] * T
    for t in reversed(range(T)):
        valid = m[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # A masked position neither produces an advantage nor breaks the chain across it.
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[t] = torch.where(valid, adv_t, 0.0)
    adv = torch.stack(advantages, dim=1)  # (B, T)
    returns = _zero_masked(adv + values, m)
    return adv, returns


@torch.no_grad()
def equal_score_groups(scores: torch.Tensor, group_size: int, tol: float = EQUAL_SCORE_TOL) -> torch.Tensor:
    """Which groups' scores are all equal, (B,) -> (B // group_size,) bool.

    Equal means max - min <= tol * max(1, max |score|) in float64: exact ties and ties up to
    float32 rounding alike. Such a group carries no group-relative signal; the group estimators
    give it advantage 0 and dynamic sampling drops it. A group with a NaN is not equal (the NaN
    reaches the advantages, where the trainer's non-finite guard sees it).
    """
    grouped = _group(scores, group_size)  # (n_prompts, G) float64
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    scale = grouped.abs().max(dim=1).values.clamp(min=1.0)
    return spread <= tol * scale


@torch.no_grad()
def compute_grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    tol: float = EQUAL_SCORE_TOL,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): score minus its group's mean, divided by the group's std.

    scores (B,) with B = n_prompts * group_size, each group contiguous. Returns (B,) float32.
    `normalize_std=False` is Dr. GRPO (Liu et al. 2025), which drops the std division because
    it up-weights prompts that are nearly always solved or failed. The std is the unbiased
    sample std (as in the GRPO paper). A group of equal scores (`equal_score_groups`, `tol`)
    gets advantage 0 exactly.
    """
    grouped = _group(scores, group_size)  # (n_prompts, G) float64
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return _zero_equal_groups(adv, scores, group_size, tol)


@torch.no_grad()
def compute_rloo_advantages(scores: torch.Tensor, group_size: int, tol: float = EQUAL_SCORE_TOL) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): baseline = mean of the group's others.

    scores (B,), groups contiguous, group_size >= 2. Returns (B,) float32:
        A_i = s_i - (sum_group - s_i) / (G - 1)
    and 0 exactly for a group of equal scores (`equal_score_groups`, `tol`).
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (the baseline is the mean of the others)")
    grouped = _group(scores, group_size)  # (n_prompts, G) float64
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return _zero_equal_groups(grouped - baseline, scores, group_size, tol)


def _zero_equal_groups(adv: torch.Tensor, scores: torch.Tensor, group_size: int, tol: float) -> torch.Tensor:
    """(n_prompts, G) float64 advantages -> (B,) float32, 0 on the groups of equal scores."""
    equal = equal_score_groups(scores, group_size, tol).unsqueeze(1)  # (n_prompts, 1)
    return torch.where(equal, 0.0, adv).reshape(-1).float()


@torch.no_grad()
def compute_reinforce_plus_plus_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go over valid tokens: G_t = r_t + gamma * G_{next valid t'}. (B, T)."""
    m = mask.bool()
    rewards = _zero_masked(rewards, m).float()
    B, T = rewards.shape
    running = rewards.new_zeros(B)  # (B,)
    returns = [None] * T
    for t in reversed(range(T)):
        valid = m[:, t]
        running = torch.where(valid, rewards[:, t] + gamma * running, running)
        returns[t] = torch.where(valid, running, 0.0)
    return torch.stack(returns, dim=1)  # (B, T)


@torch.no_grad()
def compute_reinforce_plus_plus_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): token reward-to-go, whitened across the whole batch.

    rewards (B, T) token-level (score on the last token, minus per-token KL). Returns
    (advantages, returns), both (B, T). The global batch normalisation (rather than per-group)
    is what distinguishes REINFORCE++ from GRPO.

    REINFORCE++-baseline: first subtract each group's mean score,
    `scores = compute_reinforce_plus_plus_baseline_scores(scores, group_size)`, then build the
    token rewards from those scores and call this function.
    """
    returns = compute_reinforce_plus_plus_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask), returns


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_scores(
    scores: torch.Tensor, group_size: int, tol: float = EQUAL_SCORE_TOL
) -> torch.Tensor:
    """Scores (B,) minus their group mean, the baseline of REINFORCE++-baseline. (B,).

    The same arithmetic as Dr. GRPO's advantage (0 for a group of equal scores); here it
    reshapes the reward before the token-level return and the batch-wide whitening.
    """
    return compute_grpo_advantages(scores, group_size, normalize_std=False, tol=tol)


def broadcast_sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every valid token of a sequence its sequence-level advantage: (B,) -> (B, T)."""
    adv = advantages.detach().unsqueeze(-1).expand(mask.shape).float()  # (B, T)
    return _zero_masked(adv, mask)


def _group(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // group_size, group_size) float64, checking that the groups tile the batch."""
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"batch of {scores.numel()} scores is not a whole number of groups of {group_size}")
    return scores.double().reshape(-1, group_size)


ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")


@torch.no_grad()
def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int = 1,
    kl_penalty: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One entry point for every estimator: (advantages (B, T), returns (B, T) or None).

    scores (B,): the outcome reward of each sample; samples of a prompt are contiguous groups of
    `group_size`. kl_penalty (B, T), optional: coef * KL per token, already scaled, for "KL in
    the reward" (token estimators subtract it per token; group estimators subtract its sum
    from the score). values (B, T): the critic's, needed by "gae", whose advantages are then
    whitened over the batch (the usual PPO practice). `returns` is the critic's target (gae only).
    """
    m = mask.bool()
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")
    penalty = _zero_masked(kl_penalty, m) if kl_penalty is not None else torch.zeros(m.shape)
    if estimator in ("grpo", "dr_grpo", "rloo"):
        seq_scores = scores.double() - penalty.double().sum(-1)  # (B,) float64, as the group statistics
        if estimator == "rloo":
            adv = compute_rloo_advantages(seq_scores, group_size)
        else:
            adv = compute_grpo_advantages(seq_scores, group_size, normalize_std=estimator == "grpo")
        return broadcast_sequence_advantages(adv, m), None
    if estimator == "reinforce++_baseline":
        scores = compute_reinforce_plus_plus_baseline_scores(scores, group_size)
    token_rewards = compute_token_rewards(scores, m) - penalty  # (B, T)
    if estimator == "gae":
        if values is None:
            raise ValueError("the 'gae' estimator needs critic values (B, T)")
        adv, returns = compute_gae_advantages(token_rewards, values, m, gamma, lam)
        return masked_whiten(adv, m), returns
    adv, _ = compute_reinforce_plus_plus_advantages(token_rewards, m, gamma)
    return adv, None
