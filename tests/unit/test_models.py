"""Tiny test models: build, load in transformers, round-trip the chat template."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.chat import apply_chat_template
from tests.tiny_models import build_tiny_causal_lm

TEXTS = ["State the final answer to the following arithmetic problem: 4 - 1 = Give only the final number. 3"] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "m", TEXTS, seed=0)


def test_tiny_model_loads_and_generates(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer(apply_chat_template(tokenizer, "4 - 1 ="), return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 5


def test_chat_template_round_trips_through_the_tokenizer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = apply_chat_template(tokenizer, "What is 4 - 1? ünïcode too")
    assert text == "<|im_start|>user\nWhat is 4 - 1? ünïcode too<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, not split
    assert tokenizer.decode(ids) == text


def test_seeds_change_weights_not_architecture(tiny, tmp_path):
    other = build_tiny_causal_lm(tmp_path / "m1", TEXTS, seed=1)
    a = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(tiny).get_vocab() == AutoTokenizer.from_pretrained(other).get_vocab()


@pytest.mark.slow  # converts the 135M GGUF (~30 s)
def test_smollm2_converts_once_into_a_plain_checkpoint(tmp_path):
    import time

    from rlhf.models import smollm2_instruct_path

    path = smollm2_instruct_path(tmp_path / "smollm2")
    started = time.perf_counter()
    assert smollm2_instruct_path(tmp_path / "smollm2") == path
    assert time.perf_counter() - started < 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp folder left behind
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert "<|im_start|>assistant" in apply_chat_template(tokenizer, "hi")


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    import rlhf.models as models

    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
    sapphire_rapids = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    avx2_only = "flags\t\t: fpu sse avx2 fma\n"
    assert models.cpu_bf16_flags(zen4) == {"avx512_bf16"}
    assert models.cpu_bf16_flags(sapphire_rapids) == {"avx512_bf16", "amx_bf16"}
    assert models.cpu_bf16_flags(avx2_only) == set()
    # whole flags only, and only on the flags line
    assert models.cpu_bf16_flags("flags\t\t: avx512_bf16x\nmodel name\t: avx512_bf16\n") == set()
    # auto: bf16 with AMX only (AVX512-BF16 alone: fp32 until the main job is checked in bf16)
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    for cpuinfo, expected in ((sapphire_rapids, "bfloat16"), (zen4, "float32"), (avx2_only, "float32")):
        monkeypatch.setattr(models.Path, "read_text", lambda self, text=cpuinfo: text)
        assert models.preferred_dtype() == expected
