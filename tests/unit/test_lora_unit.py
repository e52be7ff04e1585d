"""LoRA's pure parts: merged weights under the plain names, and the config checks."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlhf.config import LoraConfig, RunConfig
from rlhf.lora import lora_scale, merged_state_dict


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def test_merged_state_dict_is_the_plain_model_that_computes_like_the_adapted_one():
    base = tiny_qwen2()
    plain_names = set(base.state_dict())
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(
        base, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules)
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapters something to add
            torch.nn.init.normal_(p, std=0.5)
    state = {name: p.detach().clone() for name, p in peft_model.state_dict().items()}
    merged = merged_state_dict(state, lora_scale(lora.rank, lora.alpha))
    assert set(merged) == plain_names  # no peft prefix, no base_layer, no lora_* left over

    plain = tiny_qwen2(seed=1)  # other weights: everything must come from the merged dict
    plain.load_state_dict(merged)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-4
    # an untargeted layer passes through untouched; a targeted one moved
    layer = "model.layers.0.self_attn."
    assert torch.equal(merged[layer + "k_proj.weight"], state["base_model.model." + layer + "k_proj.weight"])
    assert not torch.equal(
        merged[layer + "q_proj.weight"], state["base_model.model." + layer + "q_proj.base_layer.weight"]
    )


def test_plain_names_pass_through():
    state = {"model.embed_tokens.weight": torch.ones(3, 2)}
    assert merged_state_dict(state, 2.0).keys() == state.keys()


def rl_config(**models):
    return {
        "models": models,
        "data": {"source": "reasoning_gym:chain_sum"},
        "algorithm": {"name": "rlvr", "advantage": "grpo"},
        "rewards": [{"kind": "reasoning_gym"}],
        "trainer": {"global_batch_size": 8, "micro_batch_size": 2},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4},
    }


def test_lora_config_fields_are_checked():
    cfg = RunConfig(**rl_config(policy={"path": "m", "lora": {"rank": 8, "alpha": 16}}))
    assert cfg.models.policy.lora == LoraConfig(rank=8, alpha=16.0)
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"target_modules": []}, {"alpha": -1}, {"ranks": 8}):
        with pytest.raises(ValueError):
            RunConfig(**rl_config(policy={"path": "m", "lora": bad}))
    with pytest.raises(ValueError, match="only the policy trains adapters"):
        RunConfig(**rl_config(policy={"path": "m"}, reference={"path": "m", "lora": {}}))


def test_adapters_off_reference_only_when_no_other_reference_is_named():
    from actors.reference import reference_is_policy_without_adapters

    def models(**m):
        return RunConfig(**rl_config(**m)).models

    lora = {"path": "m", "lora": {}}
    assert reference_is_policy_without_adapters(models(policy=lora))
    assert reference_is_policy_without_adapters(models(policy=lora, reference={"path": "m"}))
    assert not reference_is_policy_without_adapters(models(policy=lora, reference={"path": "other"}))
    assert not reference_is_policy_without_adapters(models(policy={"path": "m"}))


def test_a_lora_checkpoint_resumes_only_with_the_same_adapters():
    from rlhf.checkpoint import differences, resume_fingerprint

    plain = RunConfig(**rl_config(policy={"path": "m"}))
    lora = RunConfig(**rl_config(policy={"path": "m", "lora": {"rank": 8}}))
    assert "models.policy.lora" not in resume_fingerprint(plain)["layout"]  # older checkpoints still match
    saved = resume_fingerprint(lora)["layout"]
    assert differences(saved, resume_fingerprint(plain)["layout"])  # adapters only: no base weights to load
    other = RunConfig(**rl_config(policy={"path": "m", "lora": {"rank": 4}}))
    assert differences(saved, resume_fingerprint(other)["layout"])


def test_adapters_off_reference_routes_log_probs_to_the_policy_ranks():
    from actors.reference import AdaptersOffReference

    class FakeGroup:
        world_size = 2

        def __init__(self):
            self.calls = []

        def async_run(self, method, *args, **kwargs):
            self.calls.append(method)
            return [f"{method}@{rank}" for rank in range(self.world_size)]

    policy = FakeGroup()
    reference = AdaptersOffReference(policy)
    assert reference.async_run("compute_logprobs", "batch")[:1] == ["compute_reference_logprobs@0"]
    assert reference.async_run("release_cached_memory") == []  # the policy frees its own memory
    assert policy.calls == ["compute_reference_logprobs"]
    assert reference.dead_ranks() == [] and reference.world_size == 2
    reference.kill()  # a no-op: the policy's group is killed as the policy
