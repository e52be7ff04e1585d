"""PolicyActor.dpo_step on a real DeepSpeed engine: IPO trains on the sequence log-probs its
config names (length-averaged by default, summed on request), DPO on summed ones."""

import pytest
import torch

from rlhf.algos import compute_sequence_logprobs, dpo_loss
from rlhf.batch import collate_samples
from rlhf.config import AlgorithmConfig, DPOConfig, ModelSpec, ResourcesConfig, TrainerConfig

pytestmark = pytest.mark.integration

PAIRS = 4


def pair_batch():
    """4 pairs (rows 2i chosen, 2i+1 rejected) whose two responses differ in length (1 to 9
    tokens), so averaging and summing disagree on which response moved more."""
    g = torch.Generator().manual_seed(0)
    lengths = [(1, 9), (6, 2), (3, 8), (7, 4)]
    prompts, responses = [], []
    for chosen_len, rejected_len in lengths:
        prompt = torch.randint(3, 300, (4,), generator=g).tolist()
        for n in (chosen_len, rejected_len):
            prompts.append(prompt)
            responses.append(torch.randint(3, 300, (n,), generator=g).tolist())
    return collate_samples(prompts, responses, pad_id=0)


def expected_loss(logprobs, ref_logprobs, mask, dpo: DPOConfig) -> tuple[float, float]:
    seq, ref = (compute_sequence_logprobs(x, mask, dpo.logprob_reduction) for x in (logprobs, ref_logprobs))
    losses, chosen, rejected = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], dpo.beta, dpo.loss_type)
    return float(losses.mean()), float((chosen - rejected).mean())


def test_dpo_step_feeds_the_configured_sequence_logprobs(ray_cluster, tiny_model):
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor

    batch = pair_batch()
    g = torch.Generator().manual_seed(1)
    configs = [
        DPOConfig(beta=0.5, loss_type="ipo"),
        DPOConfig(beta=0.5, loss_type="ipo", ipo_logprobs="sum"),
        DPOConfig(beta=0.5),
    ]
    trainer = TrainerConfig(zero_stage=2, global_batch_size=PAIRS, micro_batch_size=2, lr=1e-6).model_dump()
    reported, expected = [], []
    for dpo in configs:
        plan = PlacementPlan.create(ResourcesConfig(policy={"num_actors": 1, "cpus_per_actor": 0.5}), ["policy"])
        try:
            group = ActorGroup(
                PolicyActor,
                "policy",
                plan,
                trainer=trainer,
                algorithm=AlgorithmConfig(name="dpo", dpo=dpo.model_dump()).model_dump(),
                model=ModelSpec(path=tiny_model, dtype="float32").model_dump(),
            )
            logprobs = ray_cluster.get(group.async_run("compute_logprobs", batch))[0]
            # a reference the policy has moved away from by a different amount on every token
            batch["ref_logprobs"] = logprobs - 0.3 * torch.rand(logprobs.shape, generator=g)
            metrics = ray_cluster.get(group.async_scatter("dpo_step", [batch], normalizer=float(PAIRS)))[0]
            reported.append((metrics["dpo_loss"], metrics["margin"]))
            expected.append(expected_loss(logprobs, batch["ref_logprobs"], batch["response_mask"], dpo))
        finally:
            plan.shutdown()
    for (loss, margin), (want_loss, want_margin), dpo in zip(reported, expected, configs):
        # the training forward is the same model as compute_logprobs: fp32, same inputs
        assert loss == pytest.approx(want_loss, rel=1e-4), dpo
        assert margin == pytest.approx(want_margin, rel=1e-4, abs=1e-6), dpo
    ipo_mean, ipo_sum = expected[0][0], expected[1][0]
    assert abs(ipo_mean - ipo_sum) > 1e-2, "the test batch must tell averaged from summed log-probs"
