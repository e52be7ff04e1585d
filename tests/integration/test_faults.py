"""Fault injection on the real runtime (local Ray, DeepSpeed, vLLM, tiny model): what dies or hangs, and what the run does.

- A rollout worker killed mid-generation is restarted in its bundle with the policy's current
  weights and regenerates its shard with the same seed: the step gets the samples an
  undisturbed call gives, the run finishes, `rollout/worker_restarts` counts it.
- Reward functions that hang, raise or return NaN give their fallback and are counted
  (`reward_errors/<fn>`, and `reward_timeouts/<fn>` for the hang), every step.
- A policy rank killed mid-update: the run shuts every group down, builds new ones, resumes from
  the newest checkpoint and finishes; with checkpoint.max_restarts=0 it stops with a message
  naming the dead rank and the step.
- A rank that does not answer is named (trainer.step_timeout_s), and a collective that a peer
  never joins fails after trainer.collective_timeout_s instead of hanging.

Runs are 3 steps of 4 prompts x 4 samples; "no sample lost" = every step trains on all 16.
"""

import json
import logging
import time

import pytest
import torch
from test_reliability import rl_config  # the same small GRPO run (tests/integration/test_reliability.py)

from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig

pytestmark = pytest.mark.integration

STEPS, SAMPLES = 3, 16  # 4 prompts x 4 samples per step
BAD_REWARDS = """import time

def hangs(completions, samples):
    time.sleep(3600)

def raises(completions, samples):
    raise ValueError("a bug in the reward")

def nan(completions, samples):
    return [float("nan")] * len(completions)
"""


def step_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "samples" in r]  # training steps (step 0 holds the empty held-out eval)


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def live_placement_groups() -> list[str]:
    import ray

    return [
        pg["name"]
        for pg in ray.util.placement_group_table().values()
        if pg["state"] in ("PENDING", "CREATED") and pg["name"].startswith("rlhf-")
    ]


def test_rollout_worker_killed_mid_generation_and_bad_rewards(ray_cluster, tiny_model, tmp_path, monkeypatch, caplog):
    import ray

    from actors.launch import run
    from actors.rollout import RolloutGroup

    (tmp_path / "bad.py").write_text(BAD_REWARDS)
    rewards = [{"kind": "python", "function": f"{tmp_path / 'reward.py'}:length"}]
    rewards += [
        {"kind": "python", "function": f"{tmp_path / 'bad.py'}:{fn}", "timeout_s": 1, "fallback": 0.0}
        for fn in ("hangs", "raises", "nan")
    ]
    submit, collect = RolloutGroup.async_generate_shard, RolloutGroup.collect
    shard_1_calls, killed, same_as_undisturbed = [], [], []

    def kill_worker_1_in_step_2(self, i, prompts, sampling, environment=None):
        ref = submit(self, i, prompts, sampling, environment)
        if i == 1:
            shard_1_calls.append(i)
            if len(shard_1_calls) == 2:  # step 2's generation, just submitted to worker 1
                ray.kill(self.workers[1])
                killed.append(i)
        return ref

    def collect_again_after_the_kill(self, prompts, sampling, refs, weights_from=None, environment=None):
        samples, seconds = collect(self, prompts, sampling, refs, weights_from, environment)
        if killed and not same_as_undisturbed:  # the same call once more, undisturbed (no update in between)
            again, _ = collect(self, prompts, sampling, self.start_generation(prompts, sampling), weights_from)
            same_as_undisturbed.append(
                [(s["prompt_index"], s["response_token_ids"]) for s in samples]
                == [(s["prompt_index"], s["response_token_ids"]) for s in again]
            )
        return samples, seconds

    monkeypatch.setattr(RolloutGroup, "async_generate_shard", kill_worker_1_in_step_2)
    monkeypatch.setattr(RolloutGroup, "collect", collect_again_after_the_kill)
    cfg = rl_config(
        tmp_path,
        tiny_model,
        "rollout-kill",
        rewards=rewards,
        **{"trainer.total_steps": STEPS, "resources.rollout.num_actors": 2},
    )
    with caplog.at_level(logging.WARNING):
        result = run(cfg)

    assert killed == [1] and same_as_undisturbed == [True]  # the retried shard has the lost shard's samples
    assert "rollout worker 1 died during generation (ActorDiedError); restarting it" in caplog.text
    assert result["steps"] == STEPS and result["restarts"] == 0  # handled in place: no run-level restart
    rows = step_rows(tmp_path / "rollout-kill")
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step once
    assert [r["samples"] for r in rows] == [SAMPLES] * STEPS  # no sample lost
    assert [r["rollout/worker_restarts"] for r in rows] == [0, 1, 0]
    for r in rows:
        assert r["reward_errors/python:length"] == 0 and r["reward_timeouts/python:length"] == 0
        assert r["reward_errors/python:hangs"] == r["reward_timeouts/python:hangs"] == SAMPLES
        for fn in ("raises", "nan"):
            assert (r[f"reward_errors/python:{fn}"], r[f"reward_timeouts/python:{fn}"]) == (SAMPLES, 0)
            assert r[f"reward/python:{fn}"] == 0.0  # the fallback
        assert r["reward/mean"] == pytest.approx(r["reward/python:length"])  # the bad ones added their fallback, 0
    assert "python:raises: ValueError: a bug in the reward" in caplog.text  # the first error, in full
    # the three bad rewards gave every sample the fallback: constant over the first 3 batches, said loudly
    assert [r["reward/constant_warning"] for r in rows] == [0.0, 0.0, 1.0]
    assert "python:hangs (always 0), python:nan (always 0), python:raises (always 0)" in caplog.text
    assert checkpoints(tmp_path / "rollout-kill") == [f"step_{s:08d}" for s in (1, 2, 3)]
    assert not live_placement_groups()


def kill_policy_rank_at_update(monkeypatch, rank: int, update: int) -> list:
    """Kill policy `rank` just after the driver sends it the `update`-th train_step (1-based); returns the call log."""
    import ray

    from actors.group import ActorGroup

    scatter, updates = ActorGroup.async_scatter, []

    def scatter_and_kill(self, method, parts, **kwargs):
        refs = scatter(self, method, parts, **kwargs)
        if self.role == "policy" and method == "train_step":
            updates.append(method)
            if len(updates) == update:
                ray.kill(self.actors[rank])
        return refs

    monkeypatch.setattr(ActorGroup, "async_scatter", scatter_and_kill)
    return updates


def test_policy_rank_killed_mid_update_restarts_from_the_checkpoint(
    ray_cluster, tiny_model, tmp_path, monkeypatch, caplog
):
    from actors.launch import run

    updates = kill_policy_rank_at_update(monkeypatch, rank=1, update=2)  # in step 2, after step 1's checkpoint
    cfg = rl_config(
        tmp_path, tiny_model, "policy-kill", **{"trainer.total_steps": STEPS, "resources.policy.num_actors": 2}
    )
    with caplog.at_level(logging.INFO):
        result = run(cfg)

    run_dir = tmp_path / "policy-kill"
    # what died and where; the error seen first may be the dead rank's or its peer's broken collective
    assert "policy rank 1 died during step 2 (" in caplog.text and "restarting every actor group" in caplog.text
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000001'}: step 1 done, continuing at step 2" in caplog.text
    assert result["steps"] == STEPS and result["restarts"] == 1
    assert len(updates) == 4  # steps 1, 2 (killed), 2 again, 3
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 2 logged once, by the attempt that finished it
    assert [r["samples"] for r in rows] == [SAMPLES] * STEPS
    assert checkpoints(run_dir) == [f"step_{s:08d}" for s in (1, 2, 3)]
    assert not live_placement_groups()  # the first attempt's groups were freed


def test_without_restarts_a_dead_rank_stops_the_run_with_its_name(ray_cluster, tiny_model, tmp_path, monkeypatch):
    from actors.launch import ActorFailure, run

    kill_policy_rank_at_update(monkeypatch, rank=0, update=1)
    cfg = rl_config(tmp_path, tiny_model, "no-restart", **{"trainer.total_steps": 2, "checkpoint.max_restarts": 0})
    with pytest.raises(ActorFailure) as err:
        run(cfg)
    assert str(err.value) == (
        "policy rank 0 died during step 1 (ActorDiedError); gave up after 0 restart(s) (checkpoint.max_restarts=0)"
    )
    assert not (tmp_path / "no-restart" / "checkpoints").exists() or not checkpoints(tmp_path / "no-restart")
    assert not live_placement_groups()


def test_a_rank_that_does_not_answer_is_named_and_a_lone_collective_times_out(ray_cluster, tiny_model):
    import ray

    from actors.group import ActorGroup, PlacementPlan, StepTimeoutError, ray_get
    from actors.policy import PolicyActor

    plan = PlacementPlan.create(ResourcesConfig(policy={"num_actors": 2, "cpus_per_actor": 0.5}), ["policy"])
    try:
        trainer = TrainerConfig(global_batch_size=2, micro_batch_size=1, collective_timeout_s=3).model_dump()
        group = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=ModelSpec(path=tiny_model, dtype="float32").model_dump(),
            trainer=trainer,
            algorithm=AlgorithmConfig(name="grpo").model_dump(),
        )
        ray.get(group.async_run("__ray_ready__"))

        def all_reduce(actor):
            t = torch.ones(1)
            torch.distributed.all_reduce(t)
            return float(t)

        alone = group.actors[0].__ray_call__.remote(all_reduce)  # rank 1 never joins: a hang
        answers = group.actors[1].__ray_call__.remote(lambda actor: actor.rank)
        began = time.monotonic()
        with pytest.raises(StepTimeoutError) as err:
            ray_get(1, policy=[alone, answers])
        assert str(err.value) == "policy rank(s) 0 did not answer within 1s (trainer.step_timeout_s)"
        with pytest.raises(ray.exceptions.RayTaskError, match="(?i)timed out|timeout"):
            ray.get(alone, timeout=120)
        assert time.monotonic() - began < 30  # collective_timeout_s=3 ended it, not the 600 s default
    finally:
        group.kill()
        plan.shutdown()
