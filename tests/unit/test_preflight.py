"""Requests that can never run fail before any actor starts, naming the field and what to change:
placement bundles vs the cluster's nodes (rlhf/resources.py), model paths (rlhf/models.py),
batches that do not split over a role's ranks (rlhf/config.py), and data sources, task names and
reward functions (rlhf/preflight.py; its attacks are in tests/safety/test_config_and_data.py)."""

from pathlib import Path

import pytest

from rlhf.config import ConfigError, ResourcesConfig, load_config, validate_config
from rlhf.models import check_model_paths, model_path_problem
from rlhf.resources import ResourceError, check_fit, fit_problems, placement_sets

LAPTOP = {"total": {"CPU": 2.0, "memory": 1e9}, "nodes": [{"CPU": 2.0, "memory": 1e9}]}
GPU_CLUSTER = {"total": {"CPU": 96.0, "GPU": 8.0}, "nodes": [{"CPU": 48.0, "GPU": 4.0}, {"CPU": 48.0, "GPU": 4.0}]}
RL_ROLES = ["policy", "rollout", "reference"]
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"


def res(**roles) -> ResourcesConfig:
    return ResourcesConfig(**roles)


# ------------------------------------------------------------------------------ bundles
def test_bundles_one_per_actor_and_colocated_ranks_summed():
    cfg = res(
        policy={"num_actors": 2, "cpus_per_actor": 1, "gpus_per_actor": 1},
        rollout={"num_actors": 1, "cpus_per_actor": 0.5, "gpus_per_actor": 1},
        reference={"cpus_per_actor": 0.25},
        colocate=[["policy", "rollout"]],
    )
    assert placement_sets(cfg, RL_ROLES) == [
        (["policy", "rollout"], [{"CPU": 1.5, "GPU": 2}, {"CPU": 1, "GPU": 1}]),
        (["reference"], [{"CPU": 0.25}]),
    ]


def test_what_fits_passes():
    fitting = res(**{r: {"cpus_per_actor": 0.5} for r in RL_ROLES})
    assert fit_problems(fitting, RL_ROLES, **LAPTOP) == []
    gpus = res(policy={"num_actors": 4, "gpus_per_actor": 1}, rollout={"num_actors": 4, "gpus_per_actor": 1})
    assert fit_problems(gpus, ["policy", "rollout"], **GPU_CLUSTER) == []
    # 0.1 + 0.2 + ... adds up with float error; exactly the cluster's CPUs still fits
    tenths = res(policy={"num_actors": 10, "cpus_per_actor": 0.1}, rollout={"num_actors": 10, "cpus_per_actor": 0.1})
    assert fit_problems(tenths, ["policy", "rollout"], **LAPTOP) == []


def test_too_many_cpus_in_all_names_roles_and_totals():
    cfg = res(policy={"num_actors": 8}, rollout={"cpus_per_actor": 0.5})
    with pytest.raises(ResourceError) as err:
        check_fit(cfg, ["policy", "rollout"], **LAPTOP)
    text = str(err.value)
    assert "8.5 CPU in all" in text and "policy 8 x 1 CPU" in text and "rollout 1 x 0.5 CPU" in text
    assert "the cluster has 2 CPU" in text and "resources.<role>.num_actors" in text
    assert isinstance(err.value, ConfigError)  # main() prints it as a config error (exit 2)


def test_gpu_on_a_cpu_cluster_fits_no_node():
    cfg = res(policy={"gpus_per_actor": 1})
    problems = fit_problems(cfg, ["policy", "rollout"], **LAPTOP)
    assert any(
        "policy: one actor's bundle asks 1 CPU, 1 GPU" in p
        and "largest node has 2 CPU, 0 GPU" in p
        and "resources.policy.gpus_per_actor" in p
        for p in problems
    ), problems
    assert any("1 GPU in all (policy 1 x 1 GPU)" in p and "the cluster has 0 GPU" in p for p in problems), problems


def test_a_bundle_wider_than_every_node_fails_even_if_the_total_suffices():
    # 8 GPUs in all, but one actor asking 6 cannot span two 4-GPU nodes
    cfg = res(policy={"gpus_per_actor": 6})
    problems = fit_problems(cfg, ["policy"], **GPU_CLUSTER)
    assert len(problems) == 1 and "asks 1 CPU, 6 GPU" in problems[0] and "largest node has 48 CPU, 4 GPU" in problems[0]


def test_colocated_bundle_names_every_member():
    cfg = res(policy={"cpus_per_actor": 1.5}, rollout={"cpus_per_actor": 1}, colocate=[["policy", "rollout"]])
    (problem, *_rest) = fit_problems(cfg, ["policy", "rollout"], **LAPTOP)
    assert problem.startswith("policy+rollout:") and "summed into one bundle" in problem
    assert "resources.policy.cpus_per_actor" in problem and "resources.rollout.cpus_per_actor" in problem


def test_only_the_runs_roles_count():
    cfg = res(critic={"num_actors": 50})  # the critic is not started by a GRPO run
    assert fit_problems(cfg, ["policy", "rollout"], **LAPTOP) == []


# ------------------------------------------------------------------------------ model paths
def test_model_paths(tmp_path):
    assert model_path_problem("smollm2-135m-instruct") is None  # built-in: no conversion triggered
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    assert model_path_problem(str(good)) is None
    assert "does not exist" in model_path_problem(str(tmp_path / "nope"))
    assert "run that recipe first" in model_path_problem(str(tmp_path / "runs" / "rm" / "final"))
    assert "relative to" in model_path_problem("no/such/folder")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in model_path_problem(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_text("x")
    assert "is a file" in model_path_problem(str(tmp_path / "file.bin"))


def test_check_model_paths_names_every_bad_field(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    cfg = validate_config(
        {
            "models": {
                "policy": {"path": str(good)},
                "reward": {"path": str(tmp_path / "rm")},
                "critic": {"path": "smollm2-135m-instruct"},
                "reference": {"path": str(tmp_path)},
            },
            "data": {"source": "imdb"},
            "algorithm": {"name": "ppo", "advantage": "gae"},
        }
    )
    with pytest.raises(ConfigError) as err:
        check_model_paths(cfg.models)
    text = str(err.value)
    assert f"models.reward.path = '{tmp_path / 'rm'}' does not exist" in text
    assert "models.reference.path" in text and "no config.json" in text
    assert "models.policy" not in text and "models.critic" not in text


def test_run_stops_on_a_bad_model_path_before_ray(tmp_path, monkeypatch):
    import actors.launch as launch

    monkeypatch.setattr(launch, "ensure_ray", lambda: pytest.fail("Ray was started"))
    cfg = validate_config(
        {
            "models": {"policy": {"path": str(tmp_path / "missing")}},
            "data": {"source": "imdb"},
            "algorithm": {"name": "sft"},
            "logging": {"dir": str(tmp_path)},
        }
    )
    with pytest.raises(ConfigError, match="models.policy.path"):
        launch.run(cfg)


# ------------------------------------------------------------------------------ batch splits
MINIMAL = {
    "models": {"policy": {"path": "p"}},
    "data": {"source": "reasoning_gym:chain_sum"},
    "algorithm": {"name": "grpo"},
    "rewards": [{"kind": "reasoning_gym"}],
}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "algorithm.advantage=gae",
                "models.critic.path=c",
                "trainer.global_batch_size=16",
                "trainer.micro_batch_size=4",
                "resources.critic.num_actors=3",
            ],
            r"resources.critic.num_actors \(3\)",
        ),
        (
            ["resources.rollout.num_actors=4", "rollout.prompts_per_step=2", "trainer.global_batch_size=16"],
            "resources.rollout.num_actors=4 engines share rollout.prompts_per_step=2",
        ),
    ],
)
def test_batches_that_do_not_split_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, base=MINIMAL)


def test_reward_model_training_checks_the_reward_ranks():
    base = {"models": {"reward": {"path": "r"}}, "data": {"source": "imdb"}, "algorithm": {"name": "reward_model"}}
    with pytest.raises(ConfigError, match=r"resources.reward.num_actors \(3\)"):
        load_config(None, ["resources.reward.num_actors=3"], base=base)
    load_config(None, ["resources.reward.num_actors=2"], base=base)  # 16 pairs = 4 x 2 ranks x 2 micro-batches


# ------------------------------------------------------------------------------ names and sources
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_configs_pass_the_preflight(path):
    from rlhf.preflight import check_before_start

    cfg = load_config(path)
    if cfg.data.source.startswith("runs/") and not (ROOT / cfg.data.source).exists():
        # data an earlier command writes (dpo_prefixes.yaml's pairs): that file must be the only problem
        with pytest.raises(ConfigError) as failed:
            check_before_start(cfg)
        (problem,) = str(failed.value).splitlines()[1:]
        assert problem.strip().startswith(f"data.source = {cfg.data.source!r}: no such file")
        return
    check_before_start(cfg)


def test_run_stops_on_a_misspelt_reward_function_before_ray(tmp_path, monkeypatch):
    import actors.launch as launch

    (tmp_path / "reward.py").write_text("def length(completions, samples):\n    return [len(c) for c in completions]\n")
    monkeypatch.setattr(launch, "ensure_ray", lambda: pytest.fail("Ray was started"))
    base = MINIMAL | {"models": {"policy": {"path": "smollm2-135m-instruct"}}}
    cfg = load_config(
        None,
        [f"rewards=[{{kind: python, function: '{tmp_path}/reward.py:lenght'}}]", f"logging.dir={tmp_path}"],
        base=base,
    )
    with pytest.raises(ConfigError, match=r"rewards.0.function = .*reward.py:lenght'.*did you mean 'length'\?"):
        launch.run(cfg)
