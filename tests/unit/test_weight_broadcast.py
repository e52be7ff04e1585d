"""The weight broadcast's wire (actors/weight_broadcast.py), without Ray: rank 0 in this process,
receivers in their own processes. What every receiver loads must be the sender's tensors bit for
bit, sync after sync through the reused buffer; the store listens on the address it is given and
nowhere else; a member that never comes makes the others raise at the timeout, not hang."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from actors.weight_broadcast import WeightBroadcast, WeightStore
from actors.weight_sync import pack_state_dict

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
RECEIVER = """
import hashlib, json, sys
import torch
from actors.weight_broadcast import WeightBroadcast
port, rank, world, syncs, timeout = (int(a) for a in sys.argv[1:6])
member = WeightBroadcast("127.0.0.1", port, rank, world, timeout, address="127.0.0.1")
for _ in range(syncs):
    weights = member.receive()
    digest = {name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for name, t in weights.tensors()}
    print(json.dumps(digest), flush=True)
"""


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    import hashlib

    return {
        name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in state.items()
    }


def receivers(port: int, world: int, syncs: int, timeout_s: float = 60, ranks=None) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(port), str(rank), str(world), str(syncs), str(timeout_s)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in ranks or range(1, world)
    ]


def test_every_receiver_gets_the_senders_tensors_bit_for_bit_sync_after_sync():
    store = WeightStore(HOST, 60)
    listening = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert [tuple(a) for a in listening if a.port == store.port] == [(HOST, store.port)]  # this address only
    members = receivers(store.port, world=3, syncs=2)
    try:
        sender = WeightBroadcast(HOST, store.port, 0, 3, 60, store=store.store, address=HOST)
        sent = []
        for step in range(2):  # same layout, new values: the receivers' buffers are reused
            torch.manual_seed(step)
            state = {"embed": torch.randn(300, 64), "norm": torch.randn(64).to(torch.bfloat16), "ids": torch.arange(7)}
            state["lm_head"] = state["embed"]  # tied: stored once, read under both names
            assert sender.send(pack_state_dict(state)) > 0
            sent.append(digests(state))
        for member in members:
            out, err = member.communicate(timeout=60)
            assert member.returncode == 0, err
            assert [json.loads(line) for line in out.splitlines()] == sent
    finally:
        for member in members:
            member.kill()


def test_a_member_that_never_comes_makes_the_others_raise_at_the_timeout():
    store = WeightStore(HOST, 3)
    (member,) = receivers(store.port, world=3, syncs=1, timeout_s=3, ranks=[1])  # rank 2 never starts
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            WeightBroadcast(HOST, store.port, 0, 3, 3, store=store.store, address=HOST)
        assert time.monotonic() - start < 30
        member.wait(timeout=30)
        assert member.returncode != 0
    finally:
        member.kill()
