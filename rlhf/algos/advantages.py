"""Advantage estimators: GAE (PPO), GRPO / Dr. GRPO, RLOO, REINFORCE++ (and its baseline form).

Shapes: B sequences, T token positions. Token-level tensors are (B, T) and come with a 0/1
mask (B, T) that is 1 on response tokens. Sequence-level scores are (B,). The group estimators
find the samples of one prompt by `group_ids` (B,) long: any order, any group sizes (groups.py).

Advantages are targets, never differentiated through: every function runs under no_grad.
Masked positions (left padding, prompt tokens, right padding) are skipped by the recursions:
the next valid token is the "next state", and nothing after the last valid token is
bootstrapped (its value is 0). Outputs are 0 at masked positions.

Group statistics (mean, std, leave-one-out baselines) are computed in float64, and a group whose
scores are equal up to `EQUAL_SCORE_TOL` gets advantage 0 exactly (`equal_score_groups`, the
same rule dynamic sampling uses to drop groups).

The config names an estimator (algorithm.advantage); `ADVANTAGE_ESTIMATORS` maps each name to one
`@advantage_estimator` function at the end of this file, which declares what it needs (a critic,
groups). Adding one is one decorated function here and one test (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.algos.aggregation import masked_whiten
from rlhf.algos.groups import EQUAL_SCORE_TOL, equal_score_groups, group_index, group_stats, group_sum
from rlhf.registry import Entry, Registry, summary_of


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
    advantages: list[torch.Tensor] = []  # filled from t = T-1 down to 0
    for t in reversed(range(T)):
        valid = m[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # A masked position neither produces an advantage nor breaks the chain across it.
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages.append(torch.where(valid, adv_t, 0.0))
    adv = torch.stack(advantages[::-1], dim=1)  # (B, T)
    returns = _zero_masked(adv + values, m)
    return adv, returns


@torch.no_grad()
def compute_grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
    tol: float = EQUAL_SCORE_TOL,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): score minus its group's mean, divided by the group's std.

    scores (B,), group_ids (B,) long (any order, any group sizes: groups.py). Returns (B,)
    float32. `normalize_std=False` is Dr. GRPO (Liu et al. 2025), which drops the std division
    because it up-weights prompts that are nearly always solved or failed. The std is the
    unbiased sample std (as in the GRPO paper). A group of equal scores (`equal_score_groups`,
    `tol`), a group of one row included, gets advantage 0 exactly.
    """
    x, sums, sizes = group_stats(scores, group_ids)  # (B,) float64 each
    adv = x - sums / sizes
    if normalize_std:
        inverse, counts = group_index(group_ids, x.numel())
        square_sums = group_sum(adv**2, inverse, counts.numel())[inverse]  # (B,)
        std = (square_sums / (sizes - 1).clamp(min=1)).sqrt()  # a group of one: 0 (and zeroed below)
        adv = adv / (std + eps)
    return _zero_equal_groups(adv, scores, group_ids, tol)


@torch.no_grad()
def compute_rloo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, tol: float = EQUAL_SCORE_TOL
) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): baseline = mean of the group's others.

    scores (B,), group_ids (B,) long (any order, any group sizes). Returns (B,) float32:
        A_i = s_i - (sum_group - s_i) / (n_group - 1)
    and 0 exactly for a group of equal scores (`equal_score_groups`, `tol`), which includes a
    group of one row: it has no other sample to serve as its baseline.
    """
    x, sums, sizes = group_stats(scores, group_ids)  # (B,) float64 each
    baseline = (sums - x) / (sizes - 1).clamp(min=1)
    return _zero_equal_groups(x - baseline, scores, group_ids, tol)


def _zero_equal_groups(adv: torch.Tensor, scores: torch.Tensor, group_ids: torch.Tensor, tol: float) -> torch.Tensor:
    """(B,) float64 advantages -> (B,) float32, 0 on the rows of groups of equal scores."""
    return torch.where(equal_score_groups(scores, group_ids, tol), 0.0, adv).float()


@torch.no_grad()
def compute_reinforce_plus_plus_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go over valid tokens: G_t = r_t + gamma * G_{next valid t'}. (B, T)."""
    m = mask.bool()
    rewards = _zero_masked(rewards, m).float()
    B, T = rewards.shape
    running = rewards.new_zeros(B)  # (B,)
    returns: list[torch.Tensor] = []  # filled from t = T-1 down to 0
    for t in reversed(range(T)):
        valid = m[:, t]
        running = torch.where(valid, rewards[:, t] + gamma * running, running)
        returns.append(torch.where(valid, running, 0.0))
    return torch.stack(returns[::-1], dim=1)  # (B, T)


@torch.no_grad()
def compute_reinforce_plus_plus_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): token reward-to-go, whitened across the whole batch.

    rewards (B, T) token-level (score on the last token, minus per-token KL). Returns
    (advantages, returns), both (B, T). The global batch normalisation (rather than per-group)
    is what distinguishes REINFORCE++ from GRPO.

    REINFORCE++-baseline: first subtract each group's mean score,
    `scores = compute_reinforce_plus_plus_baseline_scores(scores, group_ids)`, then build the
    token rewards from those scores and call this function.
    """
    returns = compute_reinforce_plus_plus_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask), returns


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_scores(
    scores: torch.Tensor, group_ids: torch.Tensor, tol: float = EQUAL_SCORE_TOL
) -> torch.Tensor:
    """Scores (B,) minus their group mean, the baseline of REINFORCE++-baseline. (B,).

    The same arithmetic as Dr. GRPO's advantage (0 for a group of equal scores); here it
    reshapes the reward before the token-level return and the batch-wide whitening.
    """
    return compute_grpo_advantages(scores, group_ids, normalize_std=False, tol=tol)


def broadcast_sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every valid token of a sequence its sequence-level advantage: (B,) -> (B, T)."""
    adv = advantages.detach().unsqueeze(-1).expand(mask.shape).float()  # (B, T)
    return _zero_masked(adv, mask)


# ------------------------------------------------------------------------------------ registry
Advantages = tuple[torch.Tensor, torch.Tensor | None]  # (advantages (B, T), critic returns (B, T) or None)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. Built by `compute_advantages`; estimators take what they need."""

    scores: torch.Tensor  # (B,) outcome reward of each sample
    mask: torch.Tensor  # (B, T) bool, True on response tokens
    kl_penalty: torch.Tensor  # (B, T) coef x KL per token for "KL in the reward", 0 off the mask (or all 0)
    group_ids: torch.Tensor | None = None  # (B,) long: which prompt's group each sample is in
    values: torch.Tensor | None = None  # (B, T) critic values
    gamma: float = 1.0
    lam: float = 0.95

    def groups(self) -> torch.Tensor:
        if self.group_ids is None:
            raise ValueError("this advantage estimator compares samples of one prompt: pass group_ids (B,)")
        return self.group_ids

    def sequence_scores(self) -> torch.Tensor:
        """(B,) float64: each score minus its response's summed KL penalty (sequence estimators)."""
        return self.scores.double() - self.kl_penalty.double().sum(-1)

    def token_rewards(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T): `scores` (default: the scores) on each response's last token, minus the KL penalty."""
        return compute_token_rewards(self.scores if scores is None else scores, self.mask) - self.kl_penalty


AdvantageFn = Callable[[AdvantageInputs], Advantages]


@dataclass(frozen=True)
class AdvantageEstimator(Entry):
    fn: AdvantageFn
    needs_critic: bool = False  # reads AdvantageInputs.values: the run needs models.critic
    needs_groups: bool = False  # compares the samples of a prompt: group_ids, samples_per_prompt >= 2


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def advantage_estimator(
    name: str, *, needs_critic: bool = False, needs_groups: bool = False
) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register the decorated function as the advantage estimator `name` (algorithm.advantage)."""

    def register(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS.add(AdvantageEstimator(name, summary_of(fn), fn, needs_critic, needs_groups))
        return fn

    return register


@advantage_estimator("gae", needs_critic=True)
def gae(x: AdvantageInputs) -> Advantages:
    """GAE over token rewards with the critic's values, whitened over the batch (PPO)."""
    if x.values is None:
        raise ValueError("the 'gae' estimator needs critic values (B, T)")
    adv, returns = compute_gae_advantages(x.token_rewards(), x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(adv, x.mask), returns


@advantage_estimator("grpo", needs_groups=True)
def grpo(x: AdvantageInputs) -> Advantages:
    """Score minus its group's mean, divided by the group's std (GRPO)."""
    adv = compute_grpo_advantages(x.sequence_scores(), x.groups())
    return broadcast_sequence_advantages(adv, x.mask), None


@advantage_estimator("dr_grpo", needs_groups=True)
def dr_grpo(x: AdvantageInputs) -> Advantages:
    """Score minus its group's mean, no std division (Dr. GRPO)."""
    adv = compute_grpo_advantages(x.sequence_scores(), x.groups(), normalize_std=False)
    return broadcast_sequence_advantages(adv, x.mask), None


@advantage_estimator("grpo_batch_std", needs_groups=True)
def grpo_batch_std(x: AdvantageInputs) -> Advantages:
    """Score minus its group's mean, divided by the whole batch's std (Lite PPO, Liu et al. 2025)."""
    scores = x.sequence_scores()  # (B,) float64
    centered = compute_grpo_advantages(scores, x.groups(), normalize_std=False)  # equal groups: exactly 0
    batch_std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    adv = centered.double() / (batch_std + 1e-6)  # one scale for every group: no group is up-weighted
    return broadcast_sequence_advantages(adv, x.mask), None


@advantage_estimator("rloo", needs_groups=True)
def rloo(x: AdvantageInputs) -> Advantages:
    """Score minus the mean of its group's other samples (RLOO)."""
    adv = compute_rloo_advantages(x.sequence_scores(), x.groups())
    return broadcast_sequence_advantages(adv, x.mask), None


@advantage_estimator("reinforce++")
def reinforce_plus_plus(x: AdvantageInputs) -> Advantages:
    """Token reward-to-go, whitened over the batch (REINFORCE++)."""
    adv, _ = compute_reinforce_plus_plus_advantages(x.token_rewards(), x.mask, x.gamma)
    return adv, None


@advantage_estimator("reinforce++_baseline", needs_groups=True)
def reinforce_plus_plus_baseline(x: AdvantageInputs) -> Advantages:
    """REINFORCE++ on scores minus their group's mean (REINFORCE++-baseline)."""
    scores = compute_reinforce_plus_plus_baseline_scores(x.scores, x.groups())
    adv, _ = compute_reinforce_plus_plus_advantages(x.token_rewards(scores), x.mask, x.gamma)
    return adv, None


@torch.no_grad()
def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    kl_penalty: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Advantages:
    """One entry point for every registered estimator: (advantages (B, T), returns (B, T) or None).

    scores (B,): the outcome reward of each sample. group_ids (B,) long: the group (prompt) of
    each sample, needed by estimators registered with needs_groups. kl_penalty (B, T), optional:
    coef * KL per token, already scaled, for "KL in the reward" (token estimators subtract it per
    token; group estimators subtract its sum from the score). values (B, T): the critic's, needed
    by estimators registered with needs_critic. `returns` is the critic's target (gae only).
    """
    m = mask.bool()
    entry = ADVANTAGE_ESTIMATORS[estimator]
    penalty = _zero_masked(kl_penalty, m) if kl_penalty is not None else torch.zeros(m.shape)
    return entry.fn(AdvantageInputs(scores, m, penalty, group_ids, values, gamma, lam))
