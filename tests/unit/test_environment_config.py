"""The `environment:` config section: checked against the ENVIRONMENTS registry and the
environment's own constructor, with errors that name the field."""

from __future__ import annotations

import pytest

from rlhf.config import ConfigError, load_config

AGENT = ["environment.name=calculator", "rewards=[]"]


def load(*overrides: str):
    return load_config("recipes/configs/rlvr.yaml", list(overrides))


def test_a_known_environment_loads_with_its_defaults() -> None:
    cfg = load(*AGENT)
    assert cfg.environment is not None
    assert (cfg.environment.max_turns, cfg.environment.reward, cfg.environment.step_timeout_s) == (
        4,
        "environment",
        10.0,
    )


def test_an_unknown_environment_is_named_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError, match="environment.name = 'calculater': unknown environment; did you mean 'calculator'"
    ):
        load("environment.name=calculater", "rewards=[]")


def test_settings_the_environment_does_not_take_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"environment.*rejected by 'guess_feedback'.*max_guesses"):
        load("environment.name=guess_feedback", "environment.settings={max_guesses: 0}", "rewards=[]")
    with pytest.raises(ConfigError, match="rejected by 'calculator'"):
        load(*AGENT, "environment.settings={colour: red}")


def test_environment_rewards_and_reward_functions_do_not_mix() -> None:
    with pytest.raises(ConfigError, match="environment.reward='environment'"):
        load("environment.name=calculator")  # rlvr.yaml has a reasoning_gym reward
    cfg = load("environment.name=calculator", "environment.reward=rewards")  # the functions score the last turn
    assert cfg.rewards[0].kind == "reasoning_gym"


def test_an_episode_budget_below_one_turn_is_refused() -> None:
    with pytest.raises(ConfigError, match="environment.max_tokens=16 .* below rollout.max_new_tokens=32"):
        load(*AGENT, "environment.max_tokens=16")


def test_a_module_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(ConfigError, match="environment.module 'no_such_pkg.envs' cannot be imported"):
        load(*AGENT, "environment.module=no_such_pkg.envs")


def test_a_module_registers_its_environments() -> None:
    cfg = load("environment.name=test_behaviours", "environment.module=tests.episode_environments", "rewards=[]")
    assert cfg.environment is not None and cfg.environment.name == "test_behaviours"
