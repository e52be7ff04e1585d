"""Config rules for the preference loops: which model each algorithm needs."""

from pathlib import Path

import pytest

from rlhf.config import ConfigError, validate_config
from rlhf.models import resolve_model_path

DATA = {"source": "imdb"}


def test_reward_model_run_needs_no_policy_but_a_reward_model():
    cfg = validate_config(
        {"models": {"reward": {"path": "all-minilm-l6-v2"}}, "data": DATA, "algorithm": {"name": "reward_model"}}
    )
    assert cfg.models.policy is None
    with pytest.raises(ConfigError, match="models.reward.path"):
        validate_config({"models": {}, "data": DATA, "algorithm": {"name": "reward_model"}})


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_policy_algorithms_need_a_policy(name):
    with pytest.raises(ConfigError, match="models.policy.path"):
        validate_config({"models": {"reward": {"path": "x"}}, "data": DATA, "algorithm": {"name": name}})


def test_minilm_is_a_builtin_model_folder():
    folder = resolve_model_path("all-minilm-l6-v2")
    assert (Path(folder) / "config.json").is_file()
