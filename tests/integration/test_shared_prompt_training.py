"""Shared-prompt packing and response-only logits through the real policy actor (Ray, DeepSpeed
on CPU, a tiny Qwen2): the same per-token log-probs, loss, gradient norm and updated weights as
the old path (logits at every position, one row per sample), on 1 rank (ZeRO-2, fixed rows) and
2 ranks (ZeRO-3, token budget, token-balanced shares). The batch's rows are shuffled, so rows of
one prompt are found by their prompt token ids, not by being neighbours."""

import pytest
import torch

from rlhf.algos import compute_loss_normalizer
from rlhf.batch import collate_samples
from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig

pytestmark = pytest.mark.integration

# 4 prompts x 2 samples: (prompt length, response lengths); long prompts, as in GRPO on chain_sum
GROUPS = [(30, [6, 11]), (22, [9, 3]), (40, [5, 8]), (26, [12, 7])]
BUDGET = 96  # tokens per micro-batch: a pack of 2 responses fits, a prompt's 2 rows unpacked mostly do not


def grouped_batch():
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for prompt_len, response_lens in GROUPS:
        prompt = torch.randint(3, 300, (prompt_len,), generator=g).tolist()
        for n in response_lens:
            prompts.append(prompt)
            responses.append(torch.randint(3, 300, (n,), generator=g).tolist())
    batch = collate_samples(prompts, responses, pad_id=0)
    order = torch.randperm(len(batch), generator=g)  # as the coordinator shuffles before training
    return batch.select(order)


def one_update(ray, model_path, stage, ranks, balance, **trainer_kwargs):
    """Old log-probs, one GRPO step (with a k3 KL term), new log-probs and weights."""
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor
    from actors.trainer import shard_keeping_prompts

    plan = PlacementPlan.create(ResourcesConfig(policy={"num_actors": ranks, "cpus_per_actor": 0.5}), ["policy"])
    try:
        trainer = TrainerConfig(zero_stage=stage, global_batch_size=8, micro_batch_size=4, lr=1e-3, **trainer_kwargs)
        algorithm = AlgorithmConfig(name="grpo", kl={"coef": 0.1, "estimator": "k3", "mode": "loss"})
        group = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=ModelSpec(path=model_path, dtype="float32").model_dump(),
            trainer=trainer.model_dump(),
            algorithm=algorithm.model_dump(),
        )
        batch = grouped_batch()
        mask = batch["response_mask"]
        before = ray.get(group.async_run("compute_logprobs", batch))[0]
        batch["old_logprobs"] = before + 0.2 * torch.sin(torch.arange(mask.numel()).view(mask.shape)) * mask
        batch["ref_logprobs"] = before - 0.1 * mask
        batch["advantages"] = torch.linspace(-1, 1, len(batch)).unsqueeze(1) * mask
        norm = float(compute_loss_normalizer(mask, "token_mean"))
        parts = shard_keeping_prompts(batch, ranks, balance, trainer.shared_prompt)
        plans = ray.get(group.async_scatter("micro_batch_rows", parts))
        metrics = ray.get(group.async_scatter("train_step", parts, normalizer=norm, kl_coef=0.1))
        assert len({round(m["grad_norm"], 6) for m in metrics}) == 1, metrics  # ranks agree on the global norm
        after = ray.get(group.async_run("compute_logprobs", batch))[0]
        state = ray.get(group.async_run("full_state_dict"))[0]
        return {
            "parts": parts,
            "plans": plans,
            "before": before,
            "loss": sum(m["policy_loss"] for m in metrics),
            "grad_norm": metrics[0]["grad_norm"],
            "skipped": [m["shared_prompt/tokens_skipped"] for m in metrics],
            "after": after,
            "state": state,
            "mask": mask.bool(),
        }
    finally:
        plan.shutdown()


def prompt_of(part, row):
    first = int(part["response_mask"][row].argmax())
    return tuple(part["input_ids"][row, :first].tolist())


def test_shared_prompt_and_response_logits_give_the_full_logits_update(ray_cluster, tiny_model):
    # the old path: logits at every position, one row per sample
    base = one_update(ray_cluster, tiny_model, 2, 1, False, shared_prompt="off", response_only_logits=False)
    runs = {
        "response-only logits, zero2 1 rank": one_update(ray_cluster, tiny_model, 2, 1, False, shared_prompt="off"),
        "shared prompt, zero2 1 rank, fixed rows": one_update(ray_cluster, tiny_model, 2, 1, False, shared_prompt="on"),
        "shared prompt, zero3 2 ranks, token budget": one_update(
            ray_cluster, tiny_model, 3, 2, True, shared_prompt="on", micro_batch_tokens=BUDGET
        ),
    }
    mask = base["mask"]
    assert base["skipped"] == [0.0] and runs["response-only logits, zero2 1 rank"]["skipped"] == [0.0]
    assert (base["after"] - base["before"])[mask].abs().max() > 1e-3, "the update changed nothing"

    fixed = runs["shared prompt, zero2 1 rank, fixed rows"]
    assert fixed["skipped"][0] > 0.35  # 4 prompts of 22-40 tokens each ran once instead of twice
    # micro-batches of 4 rows, a prompt's 2 rows in the same one although the rows are shuffled
    assert [len(rows) for rows in fixed["plans"][0]] == [4, 4]
    assert all(len({prompt_of(fixed["parts"][0], r) for r in rows}) == 2 for rows in fixed["plans"][0])

    ranked = runs["shared prompt, zero3 2 ranks, token budget"]
    assert all(s > 0.3 for s in ranked["skipped"]), ranked["skipped"]
    for part, plan in zip(ranked["parts"], ranked["plans"]):
        assert len(part) == 4 and len({prompt_of(part, r) for r in range(4)}) == 2  # whole groups per rank
        assert sorted(r for rows in plan for r in rows) == list(range(4))
    assert len(ranked["plans"][0]) == len(ranked["plans"][1])  # ZeRO-3's collectives pair up

    for key, run in runs.items():
        # fp32: the layouts differ only in summation order (measured: log-probs <= 2e-6)
        assert torch.allclose(run["before"][mask], base["before"][mask], atol=1e-5), (
            key,
            (run["before"] - base["before"])[mask].abs().max(),
        )
        assert run["loss"] == pytest.approx(base["loss"], abs=1e-6), key
        assert run["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5), key
        # Adam's first step moves a weight by ~lr * g / (|g| + eps): rounding shows only where a
        # gradient is near 0 (see test_packing_equivalence.py), so count the weights that differ
        diff = torch.cat([(run["state"][n] - base["state"][n]).abs().flatten() for n in base["state"]])
        assert int((diff > 1e-6).sum()) <= diff.numel() // 10_000, (key, int((diff > 1e-6).sum()), float(diff.max()))
        assert torch.allclose(run["after"][mask], base["after"][mask], atol=1e-4), (
            key,
            (run["after"] - base["after"])[mask].abs().max(),
        )


def critic_values(ray, model_path, shared_prompt):
    """The critic's values before and after one value-loss step (its dropout makes a training
    step random, so only the no-grad values are compared exactly)."""
    from actors.critic import CriticActor
    from actors.group import ActorGroup, PlacementPlan

    plan = PlacementPlan.create(ResourcesConfig(critic={"num_actors": 1, "cpus_per_actor": 0.5}), ["critic"])
    try:
        trainer = TrainerConfig(global_batch_size=8, micro_batch_size=4, shared_prompt=shared_prompt)
        group = ActorGroup(
            CriticActor,
            "critic",
            plan,
            model=ModelSpec(path=model_path, dtype="float32").model_dump(),
            trainer=trainer.model_dump(),
            algorithm=AlgorithmConfig(name="ppo").model_dump(),
            seed=0,
        )
        batch = grouped_batch()
        values = ray.get(group.async_run("compute_values", batch))[0]
        batch["old_values"], batch["returns"] = values, values + batch["response_mask"]
        norm = float(compute_loss_normalizer(batch["response_mask"], "token_mean"))
        metrics = ray.get(group.async_run("train_step", batch, normalizer=norm))[0]
        return values, metrics
    finally:
        plan.shutdown()


def test_critic_values_with_shared_prompts_equal_unshared(ray_cluster, tiny_model):
    mask = grouped_batch()["response_mask"].bool()
    plain, plain_metrics = critic_values(ray_cluster, tiny_model, "off")
    shared, shared_metrics = critic_values(ray_cluster, tiny_model, "on")  # the same fresh head (seed 0)
    assert plain[mask].abs().max() > 0
    assert torch.allclose(shared[mask], plain[mask], atol=1e-5), (shared - plain)[mask].abs().max()
    assert (shared[~mask] == 0).all()  # values outside the responses are not computed
    # a training step runs on packs (its gradients equal the unpacked ones with dropout off:
    # tests/unit/test_shared_prompt.py); here the head's dropout makes the two losses differ
    assert 0 < shared_metrics["value_loss"] < 10 and 0 < plain_metrics["value_loss"] < 10
