"""DeepSpeed trainer roles on a real local Ray: ZeRO-2/3, 1/2 ranks and gradient checkpointing agree on one update."""

import pytest
import torch

from rlhf.algos import compute_loss_normalizer
from rlhf.batch import collate_samples
from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig

pytestmark = pytest.mark.integration
TIMEOUT_S = 600  # every ray.get: DeepSpeed start-up on 2 shared cores included


def random_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(lo, hi, (1,), generator=g).item()
    prompts = [torch.randint(3, 300, (draw(2, 7),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, 300, (draw(1, 6),), generator=g).tolist() for _ in range(n)]
    return collate_samples(prompts, responses, pad_id=0)


def one_update(ray, model_path, stage, ranks, on_policy=False, trainer_settings=None, **placement):
    """Start policy ranks, take one GRPO step; return (loss, grad norm, batch, new log-probs, weights,
    the nodes the ranks ran on). `trainer_settings`: more of trainer (e.g. gradient_checkpointing);
    `placement`: more of resources.policy (node_kind, cpus_per_actor)."""
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor

    policy = {"num_actors": ranks, "cpus_per_actor": 0.5} | placement
    plan = PlacementPlan.create(ResourcesConfig(policy=policy), ["policy"])
    try:
        trainer = TrainerConfig(
            zero_stage=stage, global_batch_size=8, micro_batch_size=2, lr=1e-2, **(trainer_settings or {})
        ).model_dump()
        group = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=ModelSpec(path=model_path, dtype="float32").model_dump(),
            trainer=trainer,
            algorithm=AlgorithmConfig(name="grpo").model_dump(),
        )
        batch = random_batch()
        batch["old_logprobs"] = ray.get(group.async_run("compute_logprobs", batch), timeout=TIMEOUT_S)[0]
        adv = torch.linspace(-1, 1, len(batch)).unsqueeze(1)
        batch["advantages"] = adv * batch["response_mask"]
        norm = float(compute_loss_normalizer(batch["response_mask"], "token_mean"))
        # on_policy: leave old_logprobs out; the training forward's own (detached) log-probs stand in
        train_batch = type(batch)({k: v for k, v in batch.items() if not (on_policy and k == "old_logprobs")})
        metrics = ray.get(
            group.async_scatter("train_step", train_batch.chunk(ranks), normalizer=norm), timeout=TIMEOUT_S
        )
        loss = sum(m["policy_loss"] for m in metrics)
        assert len({round(m["grad_norm"], 6) for m in metrics}) == 1, metrics  # ranks agree on the global norm
        after = ray.get(group.async_run("compute_logprobs", batch), timeout=TIMEOUT_S)[0]
        state = ray.get(group.async_run("full_state_dict"), timeout=TIMEOUT_S)[0]
        return loss, metrics[0]["grad_norm"], batch, after, state, plan.node_ids("policy")
    finally:
        plan.shutdown()


def test_zero_stages_and_rank_counts_agree(ray_cluster, tiny_model):
    results = {(s, r): one_update(ray_cluster, tiny_model, s, r) for s, r in [(2, 1), (3, 1), (2, 2), (3, 2)]}
    results["on-policy shortcut"] = one_update(ray_cluster, tiny_model, 3, 2, on_policy=True)
    # recomputing activations in the backward must not change the loss, the gradients or the update
    results["gradient checkpointing"] = one_update(
        ray_cluster, tiny_model, 2, 1, trainer_settings={"gradient_checkpointing": True}
    )
    base_loss, base_norm, batch, base_after, base_state, _ = results[(2, 1)]
    mask = batch["response_mask"].bool()
    assert (base_after - batch["old_logprobs"])[mask].abs().max() > 1e-3, "the update changed nothing"
    for key, (loss, norm, _, after, state, _) in results.items():
        # fp32 with different reduction orders: losses agree to ~1e-6; Adam's first step moves each
        # weight by about lr * sign(grad), so weights agree to a small fraction of lr = 1e-2.
        assert loss == pytest.approx(base_loss, abs=1e-5), key
        # Adam is blind to a constant gradient scale; the gradient norm is not (catches a wrong
        # data-parallel or accumulation scaling).
        assert norm == pytest.approx(base_norm, rel=1e-4), key
        assert torch.allclose(after[mask], base_after[mask], atol=1e-3), (key, (after - base_after)[mask].abs().max())
        worst = max(float((state[n] - base_state[n]).abs().max()) for n in base_state)
        assert worst < 1e-3, (key, worst)
