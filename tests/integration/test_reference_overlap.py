"""rollout.overlap_reference on the real runtime (local Ray, vLLM and DeepSpeed on CPU, tiny model).

With async rollouts, step t+1's samples are generated during step t; with overlap_reference the
reference computes their log-probs as soon as they are generated, while the policy trains on
step t. Two async runs with a KL term, the same seeds, overlap on and off: every step trains on
the same samples with the same reference log-probs (bit for bit: the same actor runs the same
forward on the same collated batch), and the overlapped run says it used the early log-probs
from step 2 on (step 1 generates for itself).
"""

import pytest
import torch

from rlhf.config import validate_config

pytestmark = pytest.mark.integration

STEPS = 3


def config(tmp_path, model, overlap: bool):
    return validate_config(
        {
            "models": {"policy": {"path": model, "dtype": "float32"}},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": {"min_terms": 2, "max_terms": 2},
                "train_size": 32,
                "eval_size": 2,
                "chat_template": "none",
                "max_prompt_len": 64,
            },
            "algorithm": {"name": "grpo", "advantage": "grpo", "kl": {"coef": 0.1, "mode": "loss"}},
            "rollout": {
                "prompts_per_step": 2,
                "samples_per_prompt": 4,
                "max_new_tokens": 8,
                "eval_samples": 0,
                "async_rollouts": True,
                "overlap_reference": overlap,
            },
            "rewards": [{"kind": "reasoning_gym"}],
            "trainer": {
                "zero_stage": 2,
                "lr": 1e-2,
                "global_batch_size": 8,
                "micro_batch_size": 8,
                "total_steps": STEPS,
            },
            "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "reference", "rollout")},
            "logging": {"dir": str(tmp_path), "run_name": f"overlap-{overlap}", "tensorboard": False},
        }
    )


def test_reference_log_probs_computed_early_equal_those_computed_in_the_step(ray_cluster, tiny_model, tmp_path):
    from actors.coordinator import RLCoordinator
    from actors.launch import run

    batches: dict[bool, dict[int, dict]] = {True: {}, False: {}}
    metrics: dict[bool, dict[int, dict]] = {True: {}, False: {}}
    original_step, original_experience = RLCoordinator.step, RLCoordinator.make_experience

    def recording_step(self, next_prompts, step):
        out = original_step(self, next_prompts, step)
        metrics[self.overlap_reference][step] = out
        return out

    def recording_experience(self, next_prompts, step, *args):
        experience = original_experience(self, next_prompts, step, *args)
        batches[self.overlap_reference][step] = experience.batch
        return experience

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RLCoordinator, "step", recording_step)
        patch.setattr(RLCoordinator, "make_experience", recording_experience)
        for overlap in (True, False):
            run(config(tmp_path, tiny_model, overlap))
    assert sorted(batches[True]) == sorted(batches[False]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        early, late = batches[True][step], batches[False][step]
        assert torch.equal(early["input_ids"], late["input_ids"]), step
        assert torch.equal(early["ref_logprobs"], late["ref_logprobs"]), step
        assert early["ref_logprobs"][early["response_mask"].bool()].abs().sum() > 0  # real log-probs, not zeros
    assert [metrics[True][s]["reference/ahead"] for s in range(1, STEPS + 1)] == [0.0, 1.0, 1.0]
    assert "reference/ahead" not in metrics[False][2]
