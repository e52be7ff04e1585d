"""Registries: one mechanism for advantage estimators, KL estimators, policy losses and reward
kinds; the config checks names against them and reads what an entry declares."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rlhf.algos import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, compute_advantages, contiguous_group_ids
from rlhf.algos.advantages import AdvantageInputs, Advantages, advantage_estimator
from rlhf.config import ConfigError, RewardSpec, load_config
from rlhf.registry import Entry, Registry, summary_of
from rlhf.rewards.registry import REWARD_KINDS, build_reward_functions

MINIMAL = {
    "models": {"policy": {"path": "some/model"}},
    "data": {"source": "reasoning_gym:chain_sum"},
    "algorithm": {"name": "grpo"},
    "rewards": [{"kind": "reasoning_gym"}],
}


@dataclass(frozen=True)
class Thing(Entry):
    size: int = 0


def test_registry_keeps_order_refuses_duplicates_and_suggests_names():
    things: Registry[Thing] = Registry("thing")
    things.add(Thing("apple", "a fruit", 3))
    things.add(Thing("banana", "another", 5))
    assert things.names() == ("apple", "banana") and list(things) == ["apple", "banana"]
    assert "apple" in things and "cherry" not in things and len(things) == 2
    assert things["banana"].size == 5 and things.check("apple") == "apple"
    with pytest.raises(ValueError, match="thing 'apple' is registered twice"):
        things.add(Thing("apple", "again"))
    with pytest.raises(ValueError, match="unknown thing; did you mean 'banana'"):
        things["bananna"]
    with pytest.raises(ValueError, match="unknown thing; known: apple, banana"):
        things.check("kiwi")


def test_summary_is_the_first_docstring_line():
    def documented() -> None:
        """First line.

        More."""

    def bare() -> None:
        pass

    assert summary_of(documented) == "First line." and summary_of(bare) == "bare"


def test_every_piece_the_config_names_is_registered():
    assert set(ADVANTAGE_ESTIMATORS) >= {"gae", "grpo", "dr_grpo", "grpo_batch_std", "rloo", "reinforce++"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"} and "ppo" in POLICY_LOSSES
    assert set(REWARD_KINDS) == {"reasoning_gym", "math", "format", "python", "model", "http"}
    assert [e.name for e in ADVANTAGE_ESTIMATORS.entries() if e.needs_critic] == ["gae"]
    assert [e.name for e in REWARD_KINDS.entries() if e.remote] == ["model"]
    for registry in (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, REWARD_KINDS):
        assert all(e.summary.endswith(".") for e in registry.entries()), registry  # a docstring, not a name


def test_config_names_a_registered_estimator_and_reads_what_it_declares():
    cfg = load_config(None, ["algorithm.advantage=grpo_batch_std"], base=MINIMAL)
    assert cfg.algorithm.advantage_estimator is ADVANTAGE_ESTIMATORS["grpo_batch_std"]
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):  # needs_groups
        load_config(None, ["algorithm.advantage=grpo_batch_std", "rollout.samples_per_prompt=1"], base=MINIMAL)
    load_config(None, ["algorithm.advantage=reinforce++", "rollout.samples_per_prompt=1"], base=MINIMAL)
    with pytest.raises(ConfigError, match="'gae' needs a value model"):  # needs_critic
        load_config(None, ["algorithm.advantage=gae"], base=MINIMAL)


@pytest.fixture
def scratch_estimator():
    """An estimator registered by a test, removed afterwards (the registry is global)."""

    @advantage_estimator("test_constant_one")
    def constant_one(x: AdvantageInputs) -> Advantages:
        """Every response token gets advantage 1."""
        return x.mask.float(), None

    yield constant_one
    del ADVANTAGE_ESTIMATORS._entries["test_constant_one"]


def test_one_decorated_function_is_enough_for_config_and_dispatch(scratch_estimator):
    cfg = load_config(None, ["algorithm.advantage=test_constant_one"], base=MINIMAL)
    assert cfg.algorithm.advantage == "test_constant_one"
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    adv, returns = compute_advantages("test_constant_one", torch.zeros(2), mask, contiguous_group_ids(2, 2))
    assert torch.equal(adv, mask.float()) and returns is None


def test_reward_kinds_build_through_the_registry():
    (fmt, model) = build_reward_functions([RewardSpec(kind="format"), RewardSpec(kind="model")])
    assert fmt.name == "format" and fmt.fn is not None and not fmt.remote
    assert model.name == "model" and model.fn is None and model.remote
    with pytest.raises(ConfigError, match="rewards.0.kind = 'formatt': unknown reward kind; did you mean 'format'"):
        load_config(None, ["rewards=[{kind: formatt}]"], base=MINIMAL)


def test_the_policy_actor_finds_its_loss_by_name():
    from rlhf.algos import compute_policy_loss

    assert POLICY_LOSSES["ppo"].fn is compute_policy_loss
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = POLICY_LOSSES["ppo"].fn(lp, lp.detach(), torch.ones(2, 3), torch.ones(2, 3))
    loss.backward()
    assert lp.grad is not None and torch.all(lp.grad < 0)  # positive advantage: raise the log-probs
    assert float(metrics["ratio_mean"]) == 1.0
