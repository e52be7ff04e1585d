"""vLLM's CPU KV cache sized from the workload, and the peak-RSS reading (rlhf/memory.py)."""

import math

import pytest

from rlhf.memory import (
    MAX_NUM_SEQS,
    MIB,
    KVCacheError,
    kv_bytes_per_token,
    kv_cache_bytes,
    sequences_per_engine,
    vm_hwm_kib,
)

# SmolLM2-135M's config.json (the fields the KV cache depends on)
SMOLLM2 = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
}


def test_bytes_per_token_counts_keys_and_values_of_every_layer_and_kv_head():
    # 2 (K, V) x 30 layers x 3 KV heads x 64 head dim x 4 bytes
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46080
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 23040
    # no num_key_value_heads: every attention head has its own K and V (multi-head attention)
    mha = {k: v for k, v in SMOLLM2.items() if k != "num_key_value_heads"}
    assert kv_bytes_per_token(mha, "float32") == 3 * 46080
    # an explicit head_dim wins over hidden_size / heads (Qwen3, Gemma)
    assert kv_bytes_per_token(SMOLLM2 | {"head_dim": 128}, "float32") == 2 * 46080
    # a multimodal model keeps the language model's fields under text_config
    assert kv_bytes_per_token({"text_config": SMOLLM2, "vision_config": {}}, "float32") == 46080


def test_bad_config_or_dtype_names_what_is_missing():
    with pytest.raises(KVCacheError, match=r"models/x/config.json: no field 'num_hidden_layers'"):
        kv_bytes_per_token({"hidden_size": 64}, "float32", source="models/x/config.json")
    with pytest.raises(KVCacheError, match="'int8'"):
        kv_bytes_per_token(SMOLLM2, "int8")


def test_sequences_per_engine_splits_prompts_and_caps_at_the_scheduler_limit():
    assert sequences_per_engine(8, 4, 1) == 32  # the benchmark's step
    assert sequences_per_engine(8, 8, 2) == 32  # two engines take 4 prompts each
    assert sequences_per_engine(5, 4, 2) == 12  # the larger share: 3 prompts
    assert sequences_per_engine(64, 16, 1) == MAX_NUM_SEQS  # vLLM never runs more at once
    with pytest.raises(KVCacheError, match="engines"):
        sequences_per_engine(8, 4, 0)


def test_cache_holds_whole_blocks_with_a_margin():
    # the benchmark: 32 sequences of <= 128 + 32 tokens (2 blocks of 128) of SmolLM2 in fp32
    raw = 32 * 256 * 46080
    size = kv_cache_bytes(32, 160, 46080)
    assert size == -(-int(raw * 1.25) // MIB) * MIB  # margin, then rounded up to a MiB
    assert size % MIB == 0 and 0.4 * 2**30 < size < 0.5 * 2**30  # below the old fixed 1 GiB
    # one token more than a block boundary costs a whole block per sequence
    assert kv_cache_bytes(32, 257, 46080, margin=1.0) == math.ceil(32 * 384 * 46080 / MIB) * MIB
    assert kv_cache_bytes(32, 256, 46080, margin=1.0) == math.ceil(32 * 256 * 46080 / MIB) * MIB
    # bigger workloads get more: the large one (16 x 8 samples x <= 128 + 128 tokens)
    assert kv_cache_bytes(128, 256, 46080) > 2**30


def test_floor_for_tiny_models_and_bad_input():
    assert kv_cache_bytes(4, 40, 512) == 64 * MIB  # 4 x 128 x 512 B = 256 KiB -> the floor
    assert kv_cache_bytes(4, 40, 512, floor_bytes=0) == MIB  # rounded up to a MiB
    for bad in ({"sequences": 0}, {"max_len": 0}, {"margin": 0.5}):
        args = {"sequences": 4, "max_len": 40, "bytes_per_token": 512} | bad
        with pytest.raises(KVCacheError):
            kv_cache_bytes(**args)


def test_vm_hwm_reads_the_peak_line():
    status = "Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 100 kB\n"
    assert vm_hwm_kib(status) == 123456
    assert vm_hwm_kib("Name:\tkthread\n") is None
