"""Weight sync over a collective group: policy rank 0 broadcasts its packed weights (a
`FlatWeights`: index + one byte buffer) to every rollout engine over gloo.

The group is its own: 1 + engines ranks, rendezvous through a TCPStore that policy rank 0
serves on its node's address (a socket bound to that address only, not every interface), apart
from the trainers' ZeRO group. Each member's gloo device binds to its own node address too. It is
formed on the first sync that uses it and formed again after an engine restarts (a new process
holds that rank). Neither the store nor gloo authenticate: see README "Security model".

A sync is three broadcasts from rank 0: the sizes (index bytes, buffer bytes), the JSON index,
the buffer. Receivers keep their buffer from sync to sync (same size each time), and the engine
loads the tensors straight out of it. Gloo is the CPU transport; it also works between GPU
nodes (weights staged in host memory). NCCL into CUDA engines is vLLM's weight-transfer engine,
exercised by scripts/gpu_check.py, not wired here.
"""

from __future__ import annotations

import datetime
import json
import socket

import numpy as np
import ray
import torch
import torch.distributed as dist

from actors.weight_sync import FlatWeights

PREFIX = "raylhf-weights"


def node_address() -> str:
    """This process's Ray node address: what the other members connect to (127.0.0.1 on the
    local clusters this project starts, the node's private address on a real cluster)."""
    return ray.util.get_node_ip_address()


class WeightStore:
    """Rank 0's rendezvous store, listening on `host` only. Keep it alive while the group is."""

    def __init__(self, host: str, timeout_s: float) -> None:
        listener = socket.create_server((host, 0))  # bound to `host` here; the store owns it from now on
        self.host, self.port = host, listener.getsockname()[1]
        self.store = dist.TCPStore(
            host,
            self.port,
            None,
            True,
            datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
            use_libuv=False,  # the libuv server does not take a listening fd
        )


class WeightBroadcast:
    """One member of the group: rank 0 `send`s, every other rank `receive`s. Each call blocks
    until every member has made the matching call (or `timeout_s` passes: gloo raises)."""

    def __init__(
        self, host: str, port: int, rank: int, world: int, timeout_s: float, store=None, address: str | None = None
    ) -> None:
        """Join the group whose store `host:port` serves (rank 0 passes its own `store`);
        `address`: where this member's gloo connections bind (default: its Ray node address)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = store if store is not None else dist.TCPStore(host, port, None, False, timeout)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address or node_address())]
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(PREFIX, store), rank, world, options)
        self.rank, self.world = rank, world
        self._buffer = np.empty(0, dtype=np.uint8)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def send(self, weights: FlatWeights) -> int:
        """Rank 0: every receiver gets `weights`. Returns the buffer's bytes."""
        index = json.dumps(weights.index).encode()
        self._broadcast(torch.tensor([len(index), weights.nbytes], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(index), dtype=torch.uint8))
        self._broadcast(torch.from_numpy(weights.buffer))
        return weights.nbytes

    def receive(self) -> FlatWeights:
        """Any other rank: the weights rank 0 sends, as views into this member's buffer (valid
        until the next `receive`)."""
        sizes = torch.zeros(2, dtype=torch.int64)
        self._broadcast(sizes)
        index_bytes, nbytes = (int(n) for n in sizes)
        index = torch.empty(index_bytes, dtype=torch.uint8)
        self._broadcast(index)
        if self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        body = self._buffer[:nbytes]
        self._broadcast(torch.from_numpy(body))
        return FlatWeights(json.loads(index.numpy().tobytes()), body)
