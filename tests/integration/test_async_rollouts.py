"""Asynchronous rollouts on the real runtime (local Ray, vLLM and DeepSpeed on CPU, tiny model).

With rollout.async_rollouts, step t+1's samples are generated while step t trains, so they come
from the weights before step t's update: one update stale. The run below records the policy's
weights before every step, and transformers tells which weights produced each step's samples:
the engine's log-probs of the sampled tokens match the weights of step t-2 (fp32 on both sides,
different kernels: ~1e-6; tolerance 1e-4) and not those of step t-1 (an lr=1e-2 Adam step moves
them by far more). The importance-sampling metrics measure that gap against the weights being
updated. A second run is killed in step 3's training, after its step-2 checkpoint, with step 3's
samples (generated during step 2 and saved by that checkpoint) taken and step 4's (started
during step 3) in flight; resumed, it trains steps 3 and 4 on exactly the samples of the
uninterrupted run: no sample lost, none trained twice, the prefetched ones included.
"""

import json

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf.algos import compute_token_logprobs
from rlhf.config import validate_config

pytestmark = pytest.mark.integration

ATOL = 1e-4
STEPS, PROMPTS, SAMPLES = 4, 4, 4
KILLED_IN = 3  # the second run dies in this step's training, after the checkpoint of step KILLED_IN - 1
REWARD = "def length(completions, samples):\n    return [min(len(c), 40) / 40 for c in completions]\n"
# keys that depend on the wall clock, not on what was computed
TIMING = ("time/", "throughput/", "async/overlap", "async/generate_s")


def async_config(tmp_path, model, run_name="async", **checkpoint):
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
            "logging": {"dir": str(tmp_path), "run_name": run_name, "tensorboard": False},
        }
    )


def step_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def step_metrics(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in step_rows(run_dir)}


def prompt_ids(batch) -> list[tuple[int, ...]]:
    """Each row's prompt token ids (the tokens before its first response token)."""
    return [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], batch["response_mask"].argmax(-1))]


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model, tmp_path_factory):
    """An async run that records, per step, the weights before its update, its training batch and
    the prompts it drew; then a second run killed in step KILLED_IN and resumed, recording its
    batches and draws per attempt."""
    from actors.coordinator import RLCoordinator
    from actors.launch import run

    tmp = tmp_path_factory.mktemp("async")
    weights, batches, drawn = {}, {}, []
    killed = {"batches": {}, "drawn": []}  # the attempt that dies
    resumed = {"batches": {}, "drawn": []}  # the attempt that resumes it
    record = {"weights": True, "batches": batches, "drawn": drawn, "kill": False}
    original_step, original_experience, original_train = (
        RLCoordinator.step,
        RLCoordinator.make_experience,
        RLCoordinator.train,
    )

    def recording_step(self, next_prompts, step):
        if record["weights"]:
            weights[step - 1] = ray.get(self.policy.async_run("full_state_dict"))[0]  # version step-1
        self.step_under_way = step

        def draw(k):
            record["drawn"].append(step)
            return next_prompts(k)

        return original_step(self, draw, step)

    def recording_experience(self, next_prompts, step, *args):
        experience = original_experience(self, next_prompts, step, *args)
        if experience is not None:
            record["batches"][step] = experience.batch
        return experience

    def dying_train(self, batch):
        if record["kill"] and self.step_under_way == KILLED_IN:
            raise RuntimeError("killed in training")  # step KILLED_IN + 1's generation is in flight
        return original_train(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RLCoordinator, "step", recording_step)
        patch.setattr(RLCoordinator, "make_experience", recording_experience)
        patch.setattr(RLCoordinator, "train", dying_train)
        run(async_config(tmp, tiny_model))
        record.update(weights=False, batches=killed["batches"], drawn=killed["drawn"], kill=True)
        with pytest.raises(RuntimeError, match="killed in training"):
            run(async_config(tmp, tiny_model, run_name="killed"))
        record.update(batches=resumed["batches"], drawn=resumed["drawn"], kill=False)
        run(async_config(tmp, tiny_model, run_name="killed", resume=True))
    return step_metrics(tmp / "async"), tmp / "killed", weights, batches, drawn, killed, resumed


def hf_logprobs(model_path, state, batch) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return compute_token_logprobs(logits, batch["input_ids"])  # (B, T)


def test_samples_come_from_the_weights_one_update_old(runs, tiny_model):
    metrics, _, weights, batches, *_ = runs
    assert [metrics[s]["async/staleness"] for s in range(1, STEPS + 1)] == [0, 1, 1, 1]  # step 1: its own
    for step in range(1, STEPS + 1):
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
    metrics, _, weights, batches, *_ = runs
    for step in range(1, STEPS + 1):
        batch = batches[step]
        m = batch["response_mask"].bool()
        trained = hf_logprobs(tiny_model, weights[step - 1], batch)  # the weights this step updates
        expected = float((trained - batch["rollout_logprobs"])[m].abs().mean())
        reported = metrics[step]["mismatch/mean_abs_logprob_diff"]
        assert reported == pytest.approx(expected, rel=1e-3, abs=ATOL), step
        assert (reported > 100 * ATOL) == (step > 1)  # only stale samples differ
        assert 0 <= metrics[step]["mismatch/truncated_fraction"] <= 1 and metrics[step]["mismatch/kl_k3"] >= 0


def test_counts_add_up(runs):
    metrics, _, _, batches, drawn, *_ = runs
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert metrics[step]["samples"] == len(batches[step]) == PROMPTS * SAMPLES
        prompts = prompt_ids(batches[step])
        assert len(set(prompts)) == PROMPTS and all(prompts.count(p) == SAMPLES for p in prompts)
        assert 0 <= metrics[step]["async/overlap_fraction"] <= 1
        assert metrics[step]["async/overlap_s"] <= metrics[step]["async/generate_s"]
    # step 1 draws its prompts and step 2's; step t draws step t+1's; nothing past the last step
    assert drawn == [1, 1, 2, 3]
    assert metrics[1]["async/overlap_s"] == 0 and metrics[2]["async/overlap_s"] > 0


def test_killed_and_resumed_run_loses_no_sample_and_trains_none_twice(runs):
    _, run_dir, _, batches, _, killed, resumed = runs
    # the killed attempt trained steps 1-2, took step 3's samples (generated during step 2), drew
    # step 4's prompts and started their generation during step 3, then died training step 3
    assert sorted(killed["batches"]) == [1, 2, 3] and killed["drawn"] == [1, 1, 2, 3]
    # resumed from the step-2 checkpoint: step 3 trains the samples that checkpoint saved (no draw,
    # no generation); step 4's prompts are drawn again, once (the killed attempt's draw died with
    # it); nothing past the last step
    assert resumed["drawn"] == [3] and sorted(resumed["batches"]) == [3, 4]
    # every step logged once over both attempts, the killed step by the resumed attempt only
    assert sorted(r["step"] for r in step_rows(run_dir)) == list(range(1, STEPS + 1))
    trained = {1: killed["batches"][1], 2: killed["batches"][2], 3: resumed["batches"][3], 4: resumed["batches"][4]}
    for step in range(1, STEPS + 1):  # the same samples, token for token, as the uninterrupted run
        assert torch.equal(trained[step]["input_ids"], batches[step]["input_ids"]), step
        assert torch.equal(trained[step]["rollout_logprobs"], batches[step]["rollout_logprobs"]), step
    # step 3's samples are those the killed attempt generated (saved by the checkpoint), not new ones
    assert torch.equal(resumed["batches"][3]["input_ids"], killed["batches"][3]["input_ids"])
    # no prompt group trained twice: no two steps share a prompt
    groups = [set(prompt_ids(trained[s])) for s in range(1, STEPS + 1)]
    assert all(not (groups[i] & groups[j]) for i in range(STEPS) for j in range(i + 1, STEPS))


def test_resume_with_a_generation_in_flight_matches(runs):
    uninterrupted, run_dir, *_ = runs
    resumed = step_metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(TIMING) and k != "time"}
    # step 3 trains on the saved samples of the weights of step 1, step 4 on those the resumed run
    # generated with the weights of step 2 (restored from the checkpoint), as they did uninterrupted
    for step in (3, 4):
        assert resumed[step]["async/staleness"] == 1
        assert same(resumed[step]) == pytest.approx(same(uninterrupted[step]), rel=1e-5, abs=1e-6), step
