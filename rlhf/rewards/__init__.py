"""Reward functions `(completions, samples) -> list[float]`, built from config and run safely."""

from rlhf.rewards.registry import (
    NamedReward,
    build_reward_functions,
    combine_rewards,
    run_reward_function,
)

__all__ = ["NamedReward", "build_reward_functions", "combine_rewards", "run_reward_function"]
