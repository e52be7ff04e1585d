"""What happens when things go wrong, on the real runtime (local Ray, DeepSpeed, vLLM, tiny model).

Numerics: an update whose loss is NaN on one rank is skipped on every rank (ZeRO-0, -2, -3): the
weights stay bit for bit and the optimizer state is untouched (the next update is Adam's first
step). A run whose advantages turn NaN skips those steps, counts them, and after
trainer.max_nonfinite_steps consecutive ones saves a checkpoint and stops with a message naming
the role, the steps and the checkpoint.

Resources: a request bigger than the cluster fails at once, before any placement group exists,
naming the roles and what they ask (it used to wait 120 s for resources that never come).
"""

import json
import time
from pathlib import Path

import pytest
import torch

from rlhf.algos import compute_loss_normalizer
from rlhf.batch import collate_samples
from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig, validate_config
from rlhf.guards import NonFiniteError
from rlhf.resources import ResourceError

pytestmark = pytest.mark.integration

LR = 1e-2
REWARD = "def length(completions, samples):\n    return [min(len(c), 40) / 40 for c in completions]\n"


# ------------------------------------------------------------------------- one trainer, 2 ranks
def random_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (2 + i % 5,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 300, (1 + i % 4,), generator=g).tolist() for i in range(n)]
    return collate_samples(prompts, responses, pad_id=0)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_loss_on_one_rank_skips_the_update_on_every_rank(ray_cluster, tiny_model, stage):
    import ray

    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor

    plan = PlacementPlan.create(ResourcesConfig(policy={"num_actors": 2, "cpus_per_actor": 0.5}), ["policy"])
    try:
        trainer = TrainerConfig(zero_stage=stage, global_batch_size=8, micro_batch_size=2, lr=LR).model_dump()
        group = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=ModelSpec(path=tiny_model, dtype="float32").model_dump(),
            trainer=trainer,
            algorithm=AlgorithmConfig(name="grpo").model_dump(),
        )
        batch = random_batch()
        batch["advantages"] = torch.linspace(-1, 1, len(batch)).unsqueeze(1) * batch["response_mask"]
        norm = float(compute_loss_normalizer(batch["response_mask"], "token_mean"))
        start = ray.get(group.async_run("full_state_dict"))[0]

        poisoned = batch.chunk(2)
        poisoned[1]["advantages"] = torch.full_like(poisoned[1]["advantages"], float("nan"))  # rank 1 only
        metrics = ray.get(group.async_scatter("train_step", poisoned, normalizer=norm))
        assert [m["skipped_nonfinite"] for m in metrics] == [1.0, 1.0], metrics  # both ranks skipped
        assert all(m["grad_norm"] == float("inf") for m in metrics)
        after_skip = ray.get(group.async_run("full_state_dict"))[0]
        assert all(torch.equal(after_skip[n], start[n]) for n in start), "a skipped update changed weights"

        metrics = ray.get(group.async_scatter("train_step", batch.chunk(2), normalizer=norm))
        assert [m["skipped_nonfinite"] for m in metrics] == [0.0, 0.0], metrics
        after = ray.get(group.async_run("full_state_dict"))[0]
        moved = max(float((after[n] - start[n]).abs().max()) for n in start)
        # Adam's first step moves a weight by lr * g / (|g| + eps), i.e. lr for any real gradient.
        # Had the skipped update counted as an Adam step (zero or NaN gradients), this one would
        # move weights by ~0.74 lr, or to NaN.
        assert moved == pytest.approx(LR, rel=1e-3), moved
        assert all(torch.isfinite(t).all() for t in after.values())
    finally:
        plan.shutdown()


# ------------------------------------------------------------------------- a whole RL run
def rl_config(tmp_path, model, name: str, **overrides):
    (tmp_path / "reward.py").write_text(REWARD)
    raw = {
        "models": {"policy": {"path": model, "dtype": "float32"}},
        "data": {
            "source": "reasoning_gym:chain_sum",
            "task_kwargs": {"min_terms": 2, "max_terms": 2},
            "train_size": 64,
            "eval_size": 0,
            "chat_template": "none",
            "max_prompt_len": 64,
        },
        "algorithm": {"name": "grpo", "advantage": "grpo"},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8},
        "rewards": [{"kind": "python", "function": f"{tmp_path / 'reward.py'}:length"}],
        "trainer": {
            "zero_stage": 2,
            "lr": 1e-3,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "total_steps": 5,
            "max_nonfinite_steps": 2,
        },
        "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "rollout")},
        "checkpoint": {"every_n_steps": 1, "keep_last": 5},
        "logging": {"dir": str(tmp_path), "run_name": name, "tensorboard": False},
    }
    for key, value in overrides.items():  # "trainer.total_steps": 3
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_config(raw)


def policy_state(checkpoint: Path) -> tuple[dict, dict]:
    """(module weights, Adam state) of a ZeRO-2 policy checkpoint, as DeepSpeed wrote them."""
    folder = checkpoint / "policy" / "state"
    model = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    optim = torch.load(next(folder.glob("*optim_states.pt")), weights_only=False)
    return model["module"], optim["optimizer_state_dict"]["base_optimizer_state"]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_nan_advantages_are_skipped_then_stop_the_run_with_a_checkpoint(ray_cluster, tiny_model, tmp_path, monkeypatch):
    from actors import coordinator
    from actors.launch import run

    real, calls = coordinator.compute_advantages, []

    def nan_from_step_2(*args, **kwargs):  # the driver's advantages turn NaN from the second step on
        advantages, returns = real(*args, **kwargs)
        calls.append(1)
        return (torch.full_like(advantages, float("nan")) if len(calls) >= 2 else advantages), returns

    monkeypatch.setattr(coordinator, "compute_advantages", nan_from_step_2)
    with pytest.raises(NonFiniteError) as err:
        run(rl_config(tmp_path, tiny_model, "nan"))
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert str(err.value) == (
        f"policy: non-finite loss/gradients in 2 consecutive steps (steps 2..3); those updates were skipped; "
        f"last good checkpoint: {checkpoints / 'step_00000003'}; lower trainer.lr or check the rewards"
    )

    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    skips = {r["step"]: r["nonfinite_skips"] for r in rows if "nonfinite_skips" in r}
    assert skips == {1: 0.0, 2: 1.0, 3: 1.0}  # stopped after step 3 of 5
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
    assert (checkpoints / "step_00000003" / "driver.pt").is_file()  # complete: resumable

    first, first_adam = policy_state(checkpoints / "step_00000001")
    for step in (2, 3):  # the skipped steps changed neither the weights nor Adam's state
        weights, adam = policy_state(checkpoints / f"step_{step:08d}")
        assert same(weights, first), step
        assert same(adam, first_adam), step
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert any(not torch.equal(first[n], base[n]) for n in first if n in base), "step 1 did not update"


# ------------------------------------------------------------------------- resources
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"resources.policy.num_actors": 8, "trainer.global_batch_size": 16, "trainer.micro_batch_size": 1},
            ["the run asks for 4.5 CPU in all (policy 8 x 0.5 CPU, rollout 1 x 0.5 CPU)", "the cluster has 2 CPU"],
        ),
        (
            {"resources.rollout.gpus_per_actor": 1},
            [
                "rollout: one actor's bundle asks 0.5 CPU, 1 GPU",
                "largest node has 2 CPU, 0 GPU",
                "lower resources.rollout.gpus_per_actor",
            ],
        ),
    ],
)
def test_a_request_bigger_than_the_cluster_fails_at_once(ray_cluster, tiny_model, tmp_path, overrides, expected):
    import ray

    from actors.launch import run

    began = time.monotonic()
    with pytest.raises(ResourceError) as err:
        run(rl_config(tmp_path, tiny_model, "too-big", **overrides))
    assert time.monotonic() - began < 10
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)
    assert not [
        pg
        for pg in ray.util.placement_group_table().values()
        if pg["state"] in ("PENDING", "CREATED") and pg["name"].startswith("rlhf-")
    ], "a placement group was created"
