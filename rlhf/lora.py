"""LoRA weights as the rest of the system sees them: merged into plain Hugging Face names.

A peft-wrapped model names its parameters `base_model.model.<name>`, and a targeted linear
layer `<layer>.weight` becomes `<layer>.base_layer.weight` plus `<layer>.lora_A.<adapter>.weight`
(r, in) and `<layer>.lora_B.<adapter>.weight` (out, r). The engines, exports and tests want the
plain model's state dict, with W' = W + (alpha / r) * B @ A: `merged_state_dict` computes it on
copies, so the trainer's own base weights stay bit-exact (the reference is those weights with
the adapters off; peft's in-place merge/unmerge would round them).
"""

from __future__ import annotations

import torch

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"


def lora_scale(rank: int, alpha: float) -> float:
    """peft's default scaling of an adapter's output (not rsLoRA's alpha / sqrt(r))."""
    return alpha / rank


def merged_state_dict(
    state: dict[str, torch.Tensor], scale: float, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a peft LoRA model's: names without the peft prefix, the
    adapters folded into their base weights (computed in fp32, stored in the base's dtype), and
    no lora_* entries. Names that are not peft's pass through unchanged."""
    lora_a, lora_b = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name:
            continue  # folded into their layer's weight below
        plain = name.removeprefix(PEFT_PREFIX)
        if BASE_LAYER + "." in plain:
            layer, _, leaf = plain.partition(BASE_LAYER + ".")
            plain = f"{layer}.{leaf}"
            key = name.removesuffix(f"{BASE_LAYER}.{leaf}")
            if leaf == "weight" and key + lora_a in state:
                a, b = state[key + lora_a].float(), state[key + lora_b].float()  # (r, in), (out, r)
                value = (value.float() + scale * (b @ a)).to(value.dtype)  # (out, in)
        out[plain] = value
    return out
