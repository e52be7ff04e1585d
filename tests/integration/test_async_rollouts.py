"""Asynchronous rollouts on the real runtime (local Ray, vLLM and DeepSpeed on CPU, tiny model).

With rollout.async_rollouts, step t+1's samples are generated while step t trains, so they come
from the weights before step t's update: one update stale. The run below records the policy's
weights before every step, and transformers tells which weights produced each step's samples:
the engine's log-probs of the sampled tokens match the weights of step t-2 (fp32 on both sides,
different kernels: ~1e-6; tolerance 1e-4) and not those of step t-1 (an lr=1e-2 Adam step moves
them by far more). The importance-sampling metrics measure that gap against the weights being
updated. A run resumed from a checkpoint taken while a generation was in flight trains on the
same samples as the uninterrupted run.
"""

import json
import shutil

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf.algos import compute_token_logprobs
from rlhf.config import validate_config

pytestmark = pytest.mark.integration

ATOL = 1e-4
STEPS, PROMPTS, SAMPLES = 3, 4, 4
REWARD = "def length(completions, samples):\n    return [min(len(c), 40) / 40 for c in completions]\n"
# keys that depend on the wall clock, not on what was computed
TIMING = ("time/", "throughput/", "async/overlap", "async/generate_s")


def async_config(tmp_path, model, **checkpoint):
    (tmp_path / "reward.py").write_text(REWARD)  # continuous: every step's update is non-zero
    return validate_config(
        {
            "models": {"policy": {"path": model, "dtype": "float32"}},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": {"min_terms": 2, "max_terms": 2},
                "train_size": 64,
                "eval_size": 4,
                "chat_template": "none",
                "max_prompt_len": 64,
            },
            "algorithm": {"name": "grpo", "advantage": "grpo", "importance_sampling": {"enabled": True}},
            "rollout": {
                "prompts_per_step": PROMPTS,
                "samples_per_prompt": SAMPLES,
                "max_new_tokens": 8,
                "eval_samples": 0,
                "async_rollouts": True,
            },
            "rewards": [{"kind": "python", "function": f"{tmp_path / 'reward.py'}:length"}],
            # one micro-batch: the mismatch metrics are then plain token means over the step's samples
            "trainer": {
                "zero_stage": 2,
                "lr": 1e-2,
                "global_batch_size": 16,
                "micro_batch_size": 16,
                "total_steps": STEPS,
                "eval_every": 1,
            },  # held-out runs while a generation is in flight
            "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "rollout")},
            "checkpoint": {"every_n_steps": 2, **checkpoint},
            "logging": {"dir": str(tmp_path), "run_name": "async", "tensorboard": False},
        }
    )


def step_metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model, tmp_path_factory):
    """An async run that records, per step, the weights before its update, its training batch and
    the prompts it drew; then step 3 again, resumed from the step-2 checkpoint."""
    from actors.coordinator import RLCoordinator
    from actors.launch import run

    tmp = tmp_path_factory.mktemp("async")
    weights, batches, drawn = {}, {}, []
    original_step, original_experience = RLCoordinator.step, RLCoordinator.make_experience

    def recording_step(self, next_prompts, step):
        weights[step - 1] = ray.get(self.policy.async_run("full_state_dict"))[0]  # version step-1

        def draw(k):
            drawn.append(step)
            return next_prompts(k)

        return original_step(self, draw, step)

    def recording_experience(self, next_prompts, step, *args):
        experience = original_experience(self, next_prompts, step, *args)
        if experience is not None:
            batches[step] = experience.batch
        return experience

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RLCoordinator, "step", recording_step)
        patch.setattr(RLCoordinator, "make_experience", recording_experience)
        run(async_config(tmp, tiny_model))
    uninterrupted = step_metrics(tmp / "async")
    # as if the run had died after its step-2 checkpoint, with step 3's generation in flight
    shutil.rmtree(tmp / "async" / "checkpoints" / f"step_{STEPS:08d}")
    run(async_config(tmp, tiny_model, resume=True))
    return uninterrupted, step_metrics(tmp / "async"), weights, batches, drawn


def hf_logprobs(model_path, state, batch) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return compute_token_logprobs(logits, batch["input_ids"])  # (B, T)


def test_samples_come_from_the_weights_one_update_old(runs, tiny_model):
    metrics, _, weights, batches, _ = runs
    assert [metrics[s]["async/staleness"] for s in (1, 2, 3)] == [0, 1, 1]  # step 1 generates itself
    for step in (1, 2, 3):
        batch = batches[step]
        m = batch["response_mask"].bool()
        gap = {
            v: float((hf_logprobs(tiny_model, weights[v], batch) - batch["rollout_logprobs"])[m].abs().max())
            for v in range(max(0, step - 2), step)
        }
        generated_by = step - 1 - int(metrics[step]["async/staleness"])
        assert gap[generated_by] < ATOL, (step, gap)
        assert all(g > 100 * ATOL for v, g in gap.items() if v != generated_by), (step, gap)


def test_importance_sampling_measures_the_gap_to_the_weights_trained(runs, tiny_model):
    metrics, _, weights, batches, _ = runs
    for step in (1, 2, 3):
        batch = batches[step]
        m = batch["response_mask"].bool()
        trained = hf_logprobs(tiny_model, weights[step - 1], batch)  # the weights this step updates
        expected = float((trained - batch["rollout_logprobs"])[m].abs().mean())
        reported = metrics[step]["mismatch/mean_abs_logprob_diff"]
        assert reported == pytest.approx(expected, rel=1e-3, abs=ATOL), step
        assert (reported > 100 * ATOL) == (step > 1)  # only stale samples differ
        assert 0 <= metrics[step]["mismatch/truncated_fraction"] <= 1 and metrics[step]["mismatch/kl_k3"] >= 0


def test_counts_add_up(runs):
    metrics, _, _, batches, drawn = runs
    assert sorted(metrics) == [1, 2, 3]
    for step in (1, 2, 3):
        assert metrics[step]["samples"] == len(batches[step]) == PROMPTS * SAMPLES
        prompts = [
            tuple(row[:n].tolist())
            for row, n in zip(batches[step]["input_ids"], batches[step]["response_mask"].argmax(-1))
        ]
        assert len(set(prompts)) == PROMPTS and all(prompts.count(p) == SAMPLES for p in prompts)
        assert 0 <= metrics[step]["async/overlap_fraction"] <= 1
        assert metrics[step]["async/overlap_s"] <= metrics[step]["async/generate_s"]
    # step 1 draws its prompts and step 2's; step 2 draws step 3's; nothing past the last step
    assert drawn == [1, 1, 2]
    assert metrics[1]["async/overlap_s"] == 0 and metrics[2]["async/overlap_s"] > 0


def test_resume_with_a_generation_in_flight_matches(runs):
    uninterrupted, resumed, *_ = runs
    assert sorted(resumed) == [1, 2, 3]
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(TIMING) and k != "time"}
    # step 3 trains on the saved samples of the weights of step 1, as it did uninterrupted
    assert resumed[3]["async/staleness"] == 1
    assert same(resumed[3]) == pytest.approx(same(uninterrupted[3]), rel=1e-5, abs=1e-6)
