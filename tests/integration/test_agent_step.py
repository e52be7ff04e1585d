"""RL on episodes end to end through the one driver (real Ray, vLLM, DeepSpeed; tiny model):
an environment section turns every sample into an episode; broken episodes are counted per step
and in the held-out evaluation, and the run goes on."""

import json

import pytest

from rlhf.config import validate_config

pytestmark = pytest.mark.integration
PROMPTS, SAMPLES, STEPS = 4, 2, 2


def test_two_grpo_steps_on_episodes_count_broken_environments(ray_cluster, tiny_model, tmp_path):
    from actors.launch import run

    data = tmp_path / "rows.jsonl"  # every other row's environment raises
    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1), "behaviour": "raise" if i % 2 else "ok"} for i in range(24)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = validate_config(
        {
            "models": {"policy": {"path": tiny_model, "dtype": "float32"}},
            "data": {"source": str(data), "eval_size": 4},
            "environment": {
                "name": "test_behaviours",
                "module": "tests.episode_environments",
                "settings": {"slow_s": 0.0},
                "max_turns": 2,
                "max_tokens": 128,
                "step_timeout_s": 5,
            },
            "algorithm": {"name": "grpo", "advantage": "grpo"},
            "rollout": {
                "prompts_per_step": PROMPTS,
                "samples_per_prompt": SAMPLES,
                "max_new_tokens": 8,
                "eval_samples": 0,
            },
            "trainer": {
                "zero_stage": 2,
                "lr": 1e-3,
                "global_batch_size": 8,
                "micro_batch_size": 8,
                "total_steps": STEPS,
            },
            "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "rollout")},
            "logging": {"dir": str(tmp_path), "run_name": "agent", "tensorboard": False},
        }
    )
    result = run(cfg)
    assert result["steps"] == STEPS
    lines = [json.loads(line) for line in (tmp_path / "agent" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward/mean" in m]
    assert len(steps) == STEPS
    for m in steps:
        assert m["episodes/count"] == PROMPTS * SAMPLES and m["samples"] == PROMPTS * SAMPLES
        assert m["episodes/errors"] % SAMPLES == 0  # a row's environment breaks all its episodes
        ok = 1 - m["episodes/errors"] / m["episodes/count"]
        assert m["episodes/finish/max_turns"] == pytest.approx(ok)  # healthy ones: K = 2 turns
        assert m["reward/environment"] == pytest.approx(0.5 * ok)  # 0.25 a turn
        assert m["episodes/timeouts"] == 0
    assert sum(m["episodes/errors"] for m in steps) > 0
    for when in ("before", "after"):  # held-out episodes: rows 0..3 of a file split, greedy
        held_out = result[when]
        assert held_out["eval/episodes/count"] == 4
        assert held_out["eval/episodes/errors"] + 4 * held_out["eval/episodes/finish/max_turns"] == 4
