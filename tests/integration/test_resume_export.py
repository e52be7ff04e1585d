"""Checkpoint / resume and export on the real runtime (local Ray, DeepSpeed, vLLM, tiny model).

Resume: a run that crashes in step 3, after its step-2 checkpoint, and is resumed produces the
same metrics for steps 3 and 4 as a run that never stopped: the policy's weights, Adam state and
LR schedule, the adaptive KL controller, the data position and the sampling seeds all come back.
A continuous reward (response length) makes every step's update non-zero, so a resume that
restored the wrong weights or the wrong prompts would change the numbers.

Export: the final policy folder loads in `transformers` and in vLLM, and both give the same
log-probs to the same tokens.
"""

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import validate_config

pytestmark = pytest.mark.integration

STEPS, CRASH_AT = 4, 3
REWARD = "def length(completions, samples):\n    return [min(len(c), 40) / 40 for c in completions]\n"
# keys that depend on the wall clock, not on what was computed
TIMING = ("time/", "throughput/")


def rl_config(tmp_path, model, name: str, **checkpoint):
    (tmp_path / "reward.py").write_text(REWARD)
    return validate_config(
        {
            "models": {"policy": {"path": model, "dtype": "float32"}},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": {"min_terms": 2, "max_terms": 2},
                "train_size": 64,
                "eval_size": 8,
                "chat_template": "none",
                "max_prompt_len": 64,
            },
            "algorithm": {
                "name": "grpo",
                "advantage": "grpo",
                "kl": {"coef": 0.05, "mode": "reward", "adaptive": True, "target": 0.01, "horizon": 100},
            },
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8},
            "rewards": [{"kind": "python", "function": f"{tmp_path / 'reward.py'}:length"}],
            "trainer": {
                "zero_stage": 2,
                "lr": 1e-3,
                "global_batch_size": 16,
                "micro_batch_size": 8,
                "total_steps": STEPS,
                "scheduler": "linear",
            },
            "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "reference", "rollout")},
            "checkpoint": {"every_n_steps": 2, **checkpoint},
            "logging": {"dir": str(tmp_path), "run_name": name, "tensorboard": False},
        }
    )


def step_metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING) and k != "time"}
        for r in rows
        if "reward/mean" in r
    }


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model, tmp_path_factory):
    from actors import coordinator
    from actors.launch import run

    tmp = tmp_path_factory.mktemp("resume")
    uninterrupted = run(rl_config(tmp, tiny_model, "uninterrupted"))

    original = coordinator.RLCoordinator.step

    def crash_in_step_3(self, next_prompts, step):
        if step == CRASH_AT:
            raise RuntimeError("injected crash")
        return original(self, next_prompts, step)

    coordinator.RLCoordinator.step = crash_in_step_3
    try:
        with pytest.raises(RuntimeError, match="injected crash"):
            run(rl_config(tmp, tiny_model, "resumed"))
    finally:
        coordinator.RLCoordinator.step = original
    resumed = run(rl_config(tmp, tiny_model, "resumed", resume=True))
    return tmp, uninterrupted, resumed


def test_resumed_run_matches_the_uninterrupted_one(runs):
    tmp, uninterrupted, resumed = runs
    full, again = step_metrics(tmp / "uninterrupted"), step_metrics(tmp / "resumed")
    assert sorted(full) == sorted(again) == list(range(1, STEPS + 1))  # every step logged once
    for step in range(CRASH_AT, STEPS + 1):
        assert set(full[step]) == set(again[step])
        for key, value in full[step].items():
            assert again[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    # the updates were real: the policy moved and the adaptive KL coefficient changed
    assert full[STEPS]["kl_coef"] != full[1]["kl_coef"]
    assert any(abs(full[s]["policy_loss"]) > 0 for s in full)
    assert resumed["before"] == uninterrupted["before"]  # restored from the checkpoint, not re-measured
    assert resumed["after"] == pytest.approx(uninterrupted["after"])
    kept = sorted(p.name for p in (tmp / "resumed" / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000004"]


def test_exported_policy_loads_in_transformers_and_vllm(runs, tiny_model):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout import RolloutWorker
    from rlhf.algos import compute_token_logprobs

    _, uninterrupted, _ = runs
    final = uninterrupted["final_path"]
    assert any(p.suffix == ".safetensors" for p in Path(final).iterdir())
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template  # the chat template travels with the model
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start.state_dict()[n])]
    assert moved, "the exported weights are the start model's: training was not saved"

    worker = RolloutWorker.options(num_cpus=0.5).remote(final, dtype="float32", max_model_len=128)
    prompts = ["1 + 2 =", "what is 3 + 4?"]
    samples = ray.get(worker.generate.remote(prompts, {"n": 1, "temperature": 0.0, "max_tokens": 6}))
    ray.kill(worker)
    for sample in samples:
        ids = torch.tensor([sample["prompt_token_ids"] + sample["response_token_ids"]])
        with torch.no_grad():
            logprobs = compute_token_logprobs(model(input_ids=ids).logits, ids)[0]  # (T,) aligned with ids
        response = logprobs[len(sample["prompt_token_ids"]) :]
        assert torch.allclose(response, torch.tensor(sample["logprobs"]), atol=1e-3)
