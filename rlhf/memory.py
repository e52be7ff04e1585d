"""Memory from the workload and the hardware: vLLM's CPU KV cache size, and peak resident memory.

vLLM on CPU takes its KV cache as a fixed number of bytes (on GPU it takes a share of the
device's memory instead). A fixed 1 GiB is more than small workloads use (the benchmark's 32
samples of SmolLM2-135M, 160 tokens each, need 0.35 GiB in fp32) and less than large ones do
(256 samples of 1k tokens: ~11 GiB), where the scheduler then runs fewer sequences at once and
preempts. `kv_cache_bytes` sizes it from the training generation instead: sequences one engine
runs at once x their longest length (in whole blocks) x the bytes one token's keys and values
take, with a margin and a floor.

Held-out evaluation is not sized for: it sends every held-out prompt at once (hundreds), and
vLLM runs what does not fit in turn (output unchanged; it may take longer than with a cache
that holds them all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_BLOCK_TOKENS = 128  # vLLM-CPU's KV block: a sequence holds whole blocks
MAX_NUM_SEQS = 256  # vLLM-CPU's default scheduler limit on sequences run at once (LLM class)
KV_MARGIN = 1.25  # room for the scheduler's own slack (prefix-cache blocks kept, partial blocks)
KV_FLOOR_BYTES = 64 * MIB  # tiny models: never below this


class KVCacheError(ValueError):
    """A model config or workload the KV cache cannot be sized from; the message names the field."""


def kv_bytes_per_token(config: Mapping[str, Any], dtype: str, source: str = "config.json") -> int:
    """Bytes of keys and values one token takes in the cache, over all layers:
    2 (K and V) x layers x KV heads x head dim x dtype bytes. `config` is the model's
    config.json (a multimodal model's `text_config` is used when present)."""
    text = config.get("text_config") or config
    if dtype not in DTYPE_BYTES:
        raise KVCacheError(f"KV cache dtype {dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except KeyError as missing:
        raise KVCacheError(
            f"{source}: no field {missing} (needed to size the KV cache); set rollout.kv_cache_gib to a number"
        ) from None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def sequences_per_engine(prompts_per_step: int, samples_per_prompt: int, engines: int) -> int:
    """Sequences one engine runs at once in a training generation: its share of the step's
    samples (engines split the prompts), capped by vLLM's scheduler limit."""
    if min(prompts_per_step, samples_per_prompt, engines) < 1:
        raise KVCacheError(
            f"prompts_per_step ({prompts_per_step}), samples_per_prompt ({samples_per_prompt}) and engines "
            f"({engines}) must be >= 1"
        )
    return min(math.ceil(prompts_per_step / engines) * samples_per_prompt, MAX_NUM_SEQS)


def kv_cache_bytes(
    sequences: int,
    max_len: int,
    bytes_per_token: int,
    block_tokens: int = CPU_BLOCK_TOKENS,
    margin: float = KV_MARGIN,
    floor_bytes: int = KV_FLOOR_BYTES,
) -> int:
    """KV cache for `sequences` sequences of up to `max_len` tokens (prompt + response) each,
    every one holding whole blocks of `block_tokens`, times `margin`, at least `floor_bytes`,
    rounded up to a MiB. Never below one full-length sequence (vLLM refuses to start then)."""
    if sequences < 1 or max_len < 1 or bytes_per_token < 1 or block_tokens < 1 or margin < 1:
        raise KVCacheError(
            f"sequences ({sequences}), max_len ({max_len}), bytes_per_token ({bytes_per_token}) and "
            f"block_tokens ({block_tokens}) must be >= 1, margin ({margin}) >= 1"
        )
    tokens = sequences * math.ceil(max_len / block_tokens) * block_tokens  # (sequences, blocks x block) slots
    wanted = max(math.ceil(tokens * bytes_per_token * margin), floor_bytes)
    return math.ceil(wanted / MIB) * MIB


def vm_hwm_kib(proc_status: str) -> int | None:
    """The peak resident set (VmHWM, kB) from the text of /proc/<pid>/status; None if absent."""
    for line in proc_status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None
