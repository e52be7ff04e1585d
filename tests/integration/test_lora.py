"""LoRA through the real trainer, engines and checkpoints (tiny fp32 Qwen2, real Ray/DeepSpeed/vLLM).

One policy with adapters on q/v/down projections takes PPO steps at lr=1e-2. Checked: the
adapters-off reference equals a separate ReferenceActor's log-probs bit for bit (before and after
an update, so the base weights never move); a step moves only the adapted layers; the engines
that loaded the merged weights sample with the trainer's log-probs; a checkpoint holds the
adapters only and a resumed run takes the same next step; the export loads in transformers.
"""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.algos import compute_loss_normalizer
from rlhf.config import AlgorithmConfig, LoraConfig, ModelSpec, ResourcesConfig, RolloutConfig, TrainerConfig
from rlhf.data.chat import apply_chat_template
from tests.integration.test_cycle import ATOL, QUESTIONS, greedy, trainer_logprobs
from tests.integration.test_trainers import random_batch

pytestmark = pytest.mark.integration
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
TIMEOUT = 600


def get(refs):
    return ray.get(refs, timeout=TIMEOUT)


def start_policy(plan, model_path, lora=LORA):
    from actors.group import ActorGroup
    from actors.policy import PolicyActor

    spec = ModelSpec(path=model_path, dtype="float32", lora=lora).model_dump()
    trainer = TrainerConfig(zero_stage=2, global_batch_size=8, micro_batch_size=2, lr=1e-2).model_dump()
    return ActorGroup(
        PolicyActor, "policy", plan, model=spec, trainer=trainer, algorithm=AlgorithmConfig(name="grpo").model_dump()
    )


def train(policy, batch, seed):
    """One on-policy PPO step with fixed random advantages."""
    g = torch.Generator().manual_seed(seed)
    batch = type(batch)(dict(batch))
    batch["advantages"] = torch.randn(len(batch), 1, generator=g) * batch["response_mask"]
    norm = float(compute_loss_normalizer(batch["response_mask"], "token_mean"))
    return get(policy.async_run("train_step", batch, normalizer=norm))[0]


def test_lora_policy_reference_sync_resume_export(ray_cluster, tiny_model, tmp_path):
    from actors.group import ActorGroup, PlacementPlan
    from actors.reference import ReferenceActor
    from actors.rollout import RolloutGroup

    resources = ResourcesConfig(
        policy={"cpus_per_actor": 0.25}, reference={"cpus_per_actor": 0.25}, rollout={"cpus_per_actor": 0.25}
    )
    plan = PlacementPlan.create(resources, ["policy", "reference", "rollout"])
    groups = []
    try:
        policy = start_policy(plan, tiny_model)
        groups.append(policy)
        spec = ModelSpec(path=tiny_model, dtype="float32").model_dump()
        trainer = TrainerConfig(zero_stage=2, global_batch_size=8, micro_batch_size=2).model_dump()
        reference = ActorGroup(ReferenceActor, "reference", plan, model=spec, trainer=trainer)
        groups.append(reference)
        batch, mask = random_batch(), random_batch()["response_mask"].bool()

        base = get(reference.async_run("compute_logprobs", batch))[0]
        off0, on0 = get(
            policy.async_run("compute_reference_logprobs", batch) + policy.async_run("compute_logprobs", batch)
        )
        assert torch.equal(off0, base)
        assert torch.equal(on0, base)  # B starts at 0: the adapted model starts as the base

        metrics = train(policy, batch, seed=1)
        assert metrics["grad_norm"] > 0
        on1, off1 = get(
            policy.async_run("compute_logprobs", batch) + policy.async_run("compute_reference_logprobs", batch)
        )
        assert (on1 - base)[mask].abs().max() > 1e-3, "the LoRA step changed nothing"
        assert torch.equal(off1, base), "adapters off must be the untouched base weights, exactly"

        # only the adapted layers moved; the merged state has the plain model's names
        start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
        merged = get(policy.async_run("full_state_dict"))[0]
        assert set(start) <= set(merged) and not any("lora" in n or "base_layer" in n for n in merged)
        adapted = {n for n in start if any(f"{m}.weight" in n for m in LORA.target_modules)}
        assert adapted and all(not torch.equal(merged[n], start[n]) for n in adapted)
        assert all(torch.equal(merged[n], start[n]) for n in set(start) - adapted)

        # the engines get the merged weights: their log-probs are the trainer's (adapters on)
        rollout = RolloutGroup(plan, tiny_model, "float32", RolloutConfig(), max_model_len=256)
        groups.append(rollout)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        prompts = [apply_chat_template(tokenizer, q) for q in QUESTIONS]
        rt = {"policy": policy, "rollout": rollout}
        stale_batch, stale = trainer_logprobs(rt, greedy(rt, prompts), tokenizer)
        m = stale_batch["response_mask"].bool()
        assert (stale - stale_batch["rollout_logprobs"])[m].abs().max() > 100 * ATOL  # the base model's
        loads, blobs = rollout.async_sync_from(policy)
        rollout.wait_loads(loads, blobs[1:])
        fresh_batch, fresh = trainer_logprobs(rt, greedy(rt, prompts), tokenizer)
        m = fresh_batch["response_mask"].bool()
        assert (fresh - fresh_batch["rollout_logprobs"])[m].abs().max() < ATOL

        # checkpoint: adapters (+ their Adam state) only; a resumed policy takes the same next step
        folder = tmp_path / "ckpt"
        get(policy.async_run("save_checkpoint", str(folder)))
        (module_file,) = folder.rglob("*model_states.pt")
        module_state = torch.load(module_file, map_location="cpu", weights_only=False)["module"]  # our own file
        assert module_state and all("lora_" in name for name in module_state), [
            n for n in module_state if "lora_" not in n
        ]
        train(policy, batch, seed=2)
        want = get(policy.async_run("compute_logprobs", batch))[0]
        policy.kill()
        groups.remove(policy)
        resumed = start_policy(plan, tiny_model)
        groups.append(resumed)
        get(resumed.async_run("load_checkpoint", str(folder)))
        assert torch.equal(get(resumed.async_run("compute_logprobs", batch))[0], on1)
        train(resumed, batch, seed=2)
        got = get(resumed.async_run("compute_logprobs", batch))[0]
        assert torch.equal(got, want), (got - want).abs().max()

        # export merges: a plain transformers model that computes the trained policy's log-probs
        export = get(resumed.async_run("save_pretrained", str(tmp_path / "export")))[0]
        hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from rlhf.algos import compute_token_logprobs

        exported = compute_token_logprobs(logits, batch["input_ids"])
        assert (exported - got)[mask].abs().max() < ATOL
    finally:
        for group in groups:
            group.kill()
        plan.shutdown()


def test_dpo_with_lora_scores_the_reference_with_adapters_off(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """DPO with LoRA starts no reference process: the policy's adapters-off forward scores the pairs.
    Before the first update the adapters are zero, so policy = reference and the first step's
    DPO loss is exactly -log sigmoid(0) = log 2; after it the adapters have moved the policy away
    from the reference (the frozen reference log-probs were taken once, before any update)."""
    import math

    import actors.reference
    from actors.launch import run
    from tests.integration.test_resume_every_loop import dpo_config, step_metrics

    class NoReferenceProcess:
        def __init__(self, *args, **kwargs):
            raise AssertionError("DPO with LoRA started a reference process")

    monkeypatch.setattr(actors.reference, "ReferenceActor", NoReferenceProcess)
    cfg = dpo_config(tmp_path, tiny_model, "dpo-lora")
    cfg = cfg.model_copy(
        update={"models": cfg.models.model_copy(update={"policy": cfg.models.policy.model_copy(update={"lora": LORA})})}
    )
    result = run(cfg)
    losses = [m["dpo_loss"] for _, m in sorted(step_metrics(tmp_path / "dpo-lora", "dpo_loss").items())]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5), losses
    assert all(abs(loss - math.log(2)) > 1e-4 for loss in losses[1:]), losses
    assert result["before"]["eval/reward_margin"] == 0.0  # held-out: policy = reference before training
    assert result["after"]["eval/reward_margin"] != 0.0
