"""rollout.sleep_during_training on the real runtime (local Ray, vLLM and DeepSpeed on CPU).

vLLM 0.32 has no sleep mode on CPU (`enable_sleep_mode` is refused there and the CPU worker's
sleep() only logs), so here the engines keep their memory and only their asleep/awake state
changes. What this checks is the path a GPU run takes: policy and engines colocated, the engines
put to sleep after generation and woken before the weight sync, a generate or weight load while
asleep refused, and the run working and logging that sleep is a no-op here.
"""

import logging

import pytest
import ray

from rlhf.config import validate_config

pytestmark = pytest.mark.integration


def test_colocated_engines_sleep_between_generation_and_sync(ray_cluster, tiny_model, tmp_path, caplog):
    from actors.coordinator import RLCoordinator
    from rlhf.data.sources import load_prompts
    from rlhf.data.stream import PromptStream

    cfg = validate_config(
        {
            "models": {"policy": {"path": tiny_model, "dtype": "float32"}},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": {"min_terms": 2, "max_terms": 2},
                "train_size": 16,
                "eval_size": 2,
                "chat_template": "none",
                "max_prompt_len": 64,
            },
            "algorithm": {"name": "grpo", "advantage": "grpo"},
            "rollout": {
                "prompts_per_step": 2,
                "samples_per_prompt": 4,
                "max_new_tokens": 4,
                "eval_samples": 0,
                "sleep_during_training": True,
            },
            "rewards": [{"kind": "reasoning_gym"}],
            "trainer": {"zero_stage": 2, "global_batch_size": 8, "micro_batch_size": 8, "total_steps": 2},
            "resources": {
                "policy": {"cpus_per_actor": 0.5},
                "rollout": {"cpus_per_actor": 0.5},
                "colocate": [["policy", "rollout"]],
            },
            "logging": {"dir": str(tmp_path), "tensorboard": False},
        }
    )
    coordinator = RLCoordinator(cfg)
    try:
        assert coordinator.plan.groups["policy"] is coordinator.plan.groups["rollout"]
        stream = PromptStream(load_prompts(cfg.data, "train"), cfg.data.seed)
        with caplog.at_level(logging.INFO, logger="actors.coordinator"):
            steps = [coordinator.step(stream.next, step) for step in (1, 2)]
        assert all("time/sleep" in m and "time/wake" in m and m["samples"] == 8 for m in steps)
        assert sum("no sleep mode" in r.getMessage() for r in caplog.records) == 1  # said once, not every step
        # awake after the sync: held-out evaluation (between steps, at the end) can generate
        assert "eval/reward_mean" in coordinator.evaluate(load_prompts(cfg.data, "eval"))

        worker = coordinator.rollout.workers[0]
        assert ray.get(worker.sleep.remote()) is False  # nothing freed on CPU
        with pytest.raises(ray.exceptions.RayTaskError, match="generate while asleep"):
            ray.get(worker.generate.remote(["1 + 1 ="], {"n": 1, "max_tokens": 2}))
        with pytest.raises(ray.exceptions.RayTaskError, match="load_weights while asleep"):
            coordinator.sync_weights()
        ray.get(worker.wake_up.remote())
        coordinator.sync_weights()
        assert len(ray.get(worker.generate.remote(["1 + 1 ="], {"n": 1, "max_tokens": 2}))) == 1
    finally:
        coordinator.shutdown()
