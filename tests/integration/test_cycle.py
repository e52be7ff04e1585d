"""The whole runtime on a real local Ray with real vLLM and DeepSpeed engines on CPU.

Policy (2 ranks, ZeRO-3) + reference + reward + critic + 2 vLLM rollout workers share the 2 cores
(fractional CPUs) and run generate -> score -> log-probs -> update -> sync. Tiny fp32 models:
both sides compute in fp32 with different kernels, which moves log-probs by ~1e-6; stale weights
after an lr=1e-2 Adam step move them by >1e-2. So 1e-4 tells "synced" from "stale" with margin.
"""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.algos import compute_advantages, compute_kl, compute_loss_normalizer, compute_truncated_is_weights
from rlhf.batch import collate_samples
from rlhf.config import ROLES, AlgorithmConfig, ModelSpec, ResourcesConfig, RolloutConfig, TrainerConfig
from rlhf.data.chat import apply_chat_template

pytestmark = pytest.mark.integration
ATOL = 1e-4
QUESTIONS = ["3 + 4 =", "what is 10 + 2?", "12 + 7", "hello"]


def start_runtime(model_path, resources):
    from actors.critic import CriticActor
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor
    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from actors.rollout import RolloutGroup

    plan = PlacementPlan.create(resources, list(ROLES))
    spec = ModelSpec(path=model_path, dtype="float32").model_dump()
    trainer = TrainerConfig(zero_stage=3, global_batch_size=8, micro_batch_size=2, lr=1e-2).model_dump()
    algo = AlgorithmConfig(name="ppo", advantage="gae").model_dump()
    rt = {
        "plan": plan,
        "policy": ActorGroup(PolicyActor, "policy", plan, model=spec, trainer=trainer, algorithm=algo),
        "reference": ActorGroup(ReferenceActor, "reference", plan, model=spec, trainer=trainer),
        "critic": ActorGroup(CriticActor, "critic", plan, model=spec, trainer=trainer, algorithm=algo),
        "reward": ActorGroup(RewardActor, "reward", plan, model=spec, trainer=trainer),
        "rollout": RolloutGroup(plan, model_path, "float32", RolloutConfig(), max_model_len=256),
    }
    return rt


def greedy(rt, prompts):
    refs = rt["rollout"].async_generate(prompts, {"n": 1, "temperature": 0.0, "max_tokens": 8})
    return rt["rollout"].merge_samples(ray.get(refs), len(prompts))


def trainer_logprobs(rt, samples, tokenizer):
    batch = collate_samples(
        [s["prompt_token_ids"] for s in samples],
        [s["response_token_ids"] for s in samples],
        tokenizer.pad_token_id,
        {"rollout_logprobs": [s["logprobs"] for s in samples]},
    )
    return batch, ray.get(rt["policy"].async_run("compute_logprobs", batch))[0]


def test_generate_score_update_sync_cycle(ray_cluster, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [apply_chat_template(tokenizer, q) for q in QUESTIONS]
    resources = ResourcesConfig(
        policy={"num_actors": 2, "cpus_per_actor": 0.25},
        rollout={"num_actors": 2, "cpus_per_actor": 0.25},
        reference={"cpus_per_actor": 0.25},
        reward={"cpus_per_actor": 0.25},
        critic={"cpus_per_actor": 0.25},
    )
    rt = start_runtime(tiny_model, resources)
    try:
        # Each role on its own placement group; rank r of a role in bundle r.
        where = {role: ray.get(rt[role].async_run("placement")) for role in ("policy", "reference", "critic", "reward")}
        assert [rank for rank, _ in where["policy"]] == [0, 1]
        pg_ids = {role: {pg for _, pg in places} for role, places in where.items()}
        assert all(len(ids) == 1 for ids in pg_ids.values())
        assert len(set.union(*pg_ids.values())) == 4, pg_ids
        assert rt["plan"].groups["rollout"].id.hex() not in set.union(*pg_ids.values())

        # generate: 2 samples per prompt, split over the 2 workers, back in prompt order.
        refs = rt["rollout"].async_generate(prompts, {"n": 2, "temperature": 1.0, "max_tokens": 8})
        samples = rt["rollout"].merge_samples(ray.get(refs), len(prompts))
        assert [s["prompt_index"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
        batch, old_logprobs = trainer_logprobs(rt, samples, tokenizer)
        mask = batch["response_mask"]

        # score, reference log-probs, values
        texts = [tokenizer.decode(s["prompt_token_ids"]) for s in samples]
        scores, ref_logprobs, values = ray.get(
            [
                rt["reward"].async_run("score", texts, [s["text"] for s in samples])[0],
                rt["reference"].async_run("compute_logprobs", batch)[0],
                rt["critic"].async_run("compute_values", batch)[0],
            ]
        )
        assert scores.shape == (8,) and torch.isfinite(scores).all()
        # Same weights everywhere so far: engine, trainer and reference agree on every sampled token.
        _, mismatch = compute_truncated_is_weights(old_logprobs, batch["rollout_logprobs"], mask)
        assert mismatch["mean_abs_logprob_diff"] < ATOL, mismatch
        assert torch.allclose(ref_logprobs[mask.bool()], old_logprobs[mask.bool()], atol=ATOL)

        # advantages (pure) and one PPO update of policy and critic
        kl = compute_kl(old_logprobs, ref_logprobs, "k1") * mask
        advantages, returns = compute_advantages(
            "gae", scores, mask, kl_penalty=0.01 * kl, values=values, gamma=1.0, lam=0.95
        )
        batch.update(old_logprobs=old_logprobs, advantages=advantages, old_values=values, returns=returns)
        norm = float(compute_loss_normalizer(mask, "token_mean"))
        policy_refs = rt["policy"].async_scatter("train_step", batch.chunk(2), normalizer=norm)
        critic_ref = rt["critic"].async_run("train_step", batch, normalizer=norm)[0]
        policy_metrics, critic_metrics = ray.get(policy_refs), ray.get(critic_ref)
        assert all(torch.isfinite(torch.tensor(m["policy_loss"])) for m in policy_metrics)
        assert critic_metrics["value_loss"] >= 0

        # Before the sync the engines still run the old weights: their greedy log-probs disagree.
        stale = greedy(rt, prompts)
        stale_batch, stale_trainer = trainer_logprobs(rt, stale, tokenizer)
        m = stale_batch["response_mask"].bool()
        assert (stale_trainer - stale_batch["rollout_logprobs"])[m].abs().max() > 100 * ATOL

        # Sync: rank 0's blob goes to both workers through the object store (all ranks gather).
        blob_refs = rt["policy"].async_run("weights_blob")
        ray.get(rt["rollout"].async_load_weights(blob_refs[0]) + blob_refs[1:])

        fresh = greedy(rt, prompts)
        fresh_batch, fresh_trainer = trainer_logprobs(rt, fresh, tokenizer)
        m = fresh_batch["response_mask"].bool()
        assert (fresh_trainer - fresh_batch["rollout_logprobs"])[m].abs().max() < ATOL
        # ... and greedy tokens are those HF transformers picks with the trained weights.
        hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        hf.load_state_dict(ray.get(rt["policy"].async_run("full_state_dict"))[0], strict=False)
        for sample in fresh:
            ids = torch.tensor([sample["prompt_token_ids"]])
            out = hf.generate(
                ids,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            assert out[0, ids.shape[1] :].tolist()[: len(sample["response_token_ids"])] == sample["response_token_ids"]
    finally:
        for role in ("policy", "reference", "critic", "reward", "rollout"):
            rt[role].kill()
        rt["plan"].shutdown()


def test_colocated_roles_share_a_placement_group(ray_cluster, tiny_model):
    from actors.group import ActorGroup, PlacementPlan
    from actors.reference import ReferenceActor

    resources = ResourcesConfig(
        policy={"cpus_per_actor": 0.25},
        reference={"cpus_per_actor": 0.25},
        critic={"cpus_per_actor": 0.25},
        colocate=[["policy", "reference"]],
    )
    plan = PlacementPlan.create(resources, ["policy", "reference", "critic"])
    try:
        assert plan.groups["policy"] is plan.groups["reference"] is not plan.groups["critic"]
        assert plan.groups["policy"].bundle_specs == [{"CPU": 0.5}]  # one bundle holds rank 0 of both
        spec = ModelSpec(path=tiny_model, dtype="float32").model_dump()
        trainer = TrainerConfig(global_batch_size=4, micro_batch_size=4).model_dump()
        groups = [
            ActorGroup(ReferenceActor, role, plan, model=spec, trainer=trainer)
            for role in ("policy", "reference", "critic")
        ]
        (_, pg_policy), (_, pg_reference), (_, pg_critic) = (ray.get(g.async_run("placement"))[0] for g in groups)
        assert pg_policy == pg_reference == plan.groups["policy"].id.hex()
        assert pg_critic == plan.groups["critic"].id.hex() != pg_policy
    finally:
        plan.shutdown()
