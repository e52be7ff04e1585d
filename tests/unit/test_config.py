"""The config tree: YAML + dotted overrides, strict keys, actionable errors, cross-field checks."""

from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, RunConfig, TrainerConfig, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"

MINIMAL = {
    "models": {"policy": {"path": "some/model"}},
    "data": {"source": "reasoning_gym:chain_sum"},
    "algorithm": {"name": "grpo"},
    "rewards": [{"kind": "reasoning_gym"}],
}


def write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_minimal_config_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.algorithm.kl.estimator == "k3"
    assert cfg.trainer.zero_stage == "auto"
    assert cfg.rollout.samples_per_prompt == 8
    assert cfg.is_rl


@pytest.mark.parametrize(
    "zero_stage, offload, ranks, trainable, runs",
    [
        ("auto", False, 1, True, 0),  # nothing to partition over one rank
        ("auto", False, 2, True, 2),
        ("auto", True, 1, True, 2),  # ZeRO-Offload needs a ZeRO optimizer
        ("auto", False, 1, False, 0),
        (2, False, 1, True, 2),  # an explicit stage is kept
        (3, False, 1, False, 3),  # frozen roles shard only at 3
        (1, False, 4, False, 0),
    ],
)
def test_zero_stage_auto_resolves_from_ranks_and_offload(zero_stage, offload, ranks, trainable, runs):
    trainer = TrainerConfig(zero_stage=zero_stage, offload=offload)
    assert trainer.stage_for(ranks, trainable) == runs


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["algorithm.kl.coef=0.02", "resources.colocate=[[policy, reference]]"])
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg
    assert again.resources.colocate == [["policy", "reference"]]


def test_dotted_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "algorithm.kl.coef=0.02",
            "trainer.lr=1e-5",
            "rollout.stop=[a, b]",
            "trainer.offload=true",
            "rewards.0.weight=2.5",
            "models.critic.path=critic/dir",
        ],
    )
    assert cfg.algorithm.kl.coef == 0.02
    assert cfg.trainer.lr == 1e-5
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.trainer.offload is True
    assert cfg.rewards[0].weight == 2.5
    assert cfg.models.critic.path == "critic/dir"


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "algorithm.kl.cof=0.1",
            ["algorithm.kl.cof", "unknown key", "did you mean 'coef'?"],
        ),  # typo lists allowed keys
        ("trainer.lr=.inf", ["trainer.lr", "inf", "finite number"]),  # inf passes gt=0: refused on its own
        ("rewards.0.kind=maths", ["rewards.0.kind", "'maths'", "did you mean 'math'?"]),
        ("algorithm.kl.estimator=k4", ["algorithm.kl.estimator", "'k4'", "unknown KL estimator; known: k1, k2, k3"]),
        ("algorithm.advantage=rlo", ["algorithm.advantage", "'rlo'", "did you mean 'rloo'?"]),
        ("algorithm.policy_loss=pppo", ["algorithm.policy_loss", "'pppo'", "did you mean 'ppo'?"]),
        ("trainer.zero_stage=5", ["trainer.zero_stage", "5"]),
        ("rollout.top_p=1.5", ["rollout.top_p", "1.5", "less than or equal to 1"]),
        ("trainer.lr=-1", ["trainer.lr", "-1", "greater than 0"]),
        ("algorithm.name=a2c", ["algorithm.name", "'a2c'", "'ppo'"]),
        ("algorithm.dual_clip=0.5", ["algorithm.dual_clip", "0.5", "greater than 1"]),
    ],
)
def test_bad_values_name_field_value_and_allowed(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), [override])
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


def test_unknown_top_level_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="traner.*unknown key.*trainer"):
        load_config(write(tmp_path, {**MINIMAL, "traner": {"lr": 1}}))


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["trainer.lr=0", "rollout.temperature=-1"])
    assert "trainer.lr" in str(err.value) and "rollout.temperature" in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "divisible by trainer.micro_batch_size"),
        (
            ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "resources.policy.num_actors=4"],
            "resources.policy.num_actors",
        ),
        (["rollout.prompts_per_step=3", "rollout.samples_per_prompt=2"], "samples per step"),
        (["rollout.samples_per_prompt=1", "rollout.prompts_per_step=16"], "samples_per_prompt must be >= 2"),
        (["algorithm.advantage=gae"], "models.critic"),
        (["algorithm.clip_high=0.1"], "clip-higher"),
        (["resources.colocate=[[policy, reference], [reference, rollout]]"], "more than one colocate group"),
        (["rewards=[]"], "needs a reward"),
        (["rewards=[{kind: python, function: no_colon}]"], "path/to/file.py:function"),
        (["rewards=[{kind: model}]"], "models.reward"),
        (["rollout.sleep_during_training=true"], "add a group such as \\[policy, rollout\\]"),
        (
            [
                "rollout.sleep_during_training=true",
                "resources.colocate=[[policy, rollout]]",
                "rollout.async_rollouts=true",
            ],
            "choose one",
        ),
        (
            ["rollout.tensor_parallel_size=2"],
            "resources.rollout.gpus_per_actor=2",
        ),  # the bundle must hold the engine's GPUs
    ],
)
def test_cross_field_checks(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_sleep_during_training_with_colocated_rollout(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL), ["rollout.sleep_during_training=true", "resources.colocate=[[policy, rollout]]"]
    )
    assert cfg.rollout.sleep_during_training and cfg.rollout.async_rollouts == "auto"  # auto: sync with sleep
    assert (
        load_config(
            write(tmp_path, MINIMAL), ["rollout.async_rollouts=true", "rollout.max_staleness=2"]
        ).rollout.max_staleness
        == 2
    )
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(write(tmp_path, MINIMAL), ["rollout.max_staleness=0"])


def test_dpo_needs_no_rollout_or_reward(tmp_path):
    raw = {**MINIMAL, "algorithm": {"name": "dpo", "dpo": {"beta": 0.2, "loss_type": "ipo"}}, "rewards": []}
    cfg = load_config(write(tmp_path, raw))
    assert not cfg.is_rl and cfg.algorithm.dpo.loss_type == "ipo"


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(write(tmp_path, MINIMAL), ["just_a_word"])


def test_assignment_is_validated(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValueError):
        cfg.rollout.temperature = -3.0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_configs_validate(path):
    assert isinstance(load_config(path), RunConfig)
