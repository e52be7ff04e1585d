"""Pure torch RLHF algorithms: tensors, masks and scalars in, tensors out.

No Ray, DeepSpeed or vLLM here; every function is unit-tested on CPU (tests/unit).
"""

from rlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    advantage_estimator,
    broadcast_sequence_advantages,
    compute_advantages,
    compute_gae_advantages,
    compute_grpo_advantages,
    compute_reinforce_plus_plus_advantages,
    compute_reinforce_plus_plus_baseline_scores,
    compute_reinforce_plus_plus_returns,
    compute_rloo_advantages,
    compute_token_rewards,
)
from rlhf.algos.aggregation import (
    AGG_MODES,
    aggregate_loss,
    compute_loss_normalizer,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from rlhf.algos.dynamic_sampling import informative_group_rows, whole_group_count
from rlhf.algos.groups import EQUAL_SCORE_TOL, contiguous_group_ids, equal_score_groups
from rlhf.algos.importance import compute_truncated_is_weights
from rlhf.algos.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    compute_kl,
    kl_estimator,
    kl_loss,
)
from rlhf.algos.losses import (
    POLICY_LOSSES,
    bradley_terry_loss,
    compute_entropy,
    compute_entropy_from_logprobs,
    compute_policy_loss,
    compute_sequence_logprobs,
    compute_token_logprobs,
    compute_value_loss,
    dpo_loss,
    policy_loss,
    reward_model_loss,
    sft_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "EQUAL_SCORE_TOL",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageInputs",
    "FixedKLController",
    "advantage_estimator",
    "aggregate_loss",
    "apply_kl_penalty",
    "bradley_terry_loss",
    "broadcast_sequence_advantages",
    "compute_advantages",
    "compute_entropy",
    "compute_entropy_from_logprobs",
    "compute_gae_advantages",
    "compute_grpo_advantages",
    "compute_kl",
    "compute_loss_normalizer",
    "compute_policy_loss",
    "compute_reinforce_plus_plus_advantages",
    "compute_reinforce_plus_plus_baseline_scores",
    "compute_reinforce_plus_plus_returns",
    "compute_rloo_advantages",
    "compute_sequence_logprobs",
    "compute_token_logprobs",
    "compute_token_rewards",
    "compute_truncated_is_weights",
    "compute_value_loss",
    "contiguous_group_ids",
    "dpo_loss",
    "equal_score_groups",
    "informative_group_rows",
    "kl_estimator",
    "kl_loss",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "policy_loss",
    "reward_model_loss",
    "sft_loss",
    "whole_group_count",
]
