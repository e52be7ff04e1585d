"""Shared fixtures for integration and e2e tests: one real local Ray per session, tiny real models,
and a private `ray start --head` node for tests of the cluster path."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TEXTS = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)] + ["hello world", "the answer is"]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from actors.local_cluster import start_local_cluster

    # The launcher's own private cluster (token auth, loopback only, stopped with this process),
    # never one named by RAY_ADDRESS: tests must not run on someone's real cluster.
    start_local_cluster(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=0)


# ------------------------------------------------------------------- a private `ray start` head
@dataclass
class HeadNode:
    proc: subprocess.Popen  # `ray start --head --block`
    temp_dir: Path
    log_path: Path
    token: str
    ports: dict[str, int]

    @property
    def dashboard(self) -> str:  # the job API
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_head():
    """A head node started as the README's "Submitting a job" section starts one: token auth
    (`RAY_AUTH_MODE=token`, here the token in RAY_AUTH_TOKEN instead of ~/.ray/auth_token, which
    belongs to the user), node address and dashboard on 127.0.0.1 with Ray's local-only switch.
    Its own ports and temp dir: it touches no other Ray on the machine. Stopped by ending the
    `ray start --block` process and its descendants, never with `ray stop` (which stops every Ray
    on the machine)."""
    # Short path: Ray's unix sockets live under the temp dir and must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))
    names = [
        "gcs",
        "dashboard",
        "client",
        "agent_http",
        "agent_grpc",
        "runtime_env",
        "metrics",
        "node_manager",
        "object_manager",
    ]
    ports = dict(zip(names, free_ports(len(names))))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log_path = temp_dir / "ray_start.log"
    # Every port is given: the defaults (6379, 8265, 10001, 52365, ...) may belong to another Ray.
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    head = HeadNode(proc, temp_dir, log_path, token, ports)
    try:
        wait_for_dashboard(head)
        yield head
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs: a failed assertion quotes their tail


def wait_for_dashboard(head: HeadNode, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({head.proc.returncode}):\n{head.log_path.read_text()[-3000:]}")
        try:  # the dashboard answers, and `ray start` has started the raylet too
            urllib.request.urlopen(
                urllib.request.Request(f"{head.dashboard}/api/version", headers=head.auth), timeout=5
            )
            if "Ray runtime started" in head.log_path.read_text():
                return
            raise OSError("the raylet is still starting")
        except OSError:  # not up yet (urllib's errors are OSErrors)
            if time.time() > deadline:
                raise
            time.sleep(1)


def stop_head(proc: subprocess.Popen) -> None:
    import psutil

    # Everything this head started (GCS, raylet, dashboard, agents, workers, the job's driver)
    # descends from the `ray start` process; take the list before it goes, since orphans are
    # re-parented. Other Rays' processes are never on it.
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()  # `ray start --block` then stops the processes it started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:  # a safety net: in trials SIGTERM left nothing behind
        p.kill()
    psutil.wait_procs(alive, timeout=5)


# ------------------------------------------------------------- several `ray start` nodes on this machine
@pytest.fixture(scope="module")
def multinode_cluster(request):
    """A head and worker nodes started as `scripts/cluster.sh up` starts them (actors/multinode.py:
    token auth with a fresh token file, loopback only, node_kind:<kind> on each node), with this
    process joined as the driver. The test module names the kinds: NODE_KINDS = (head kind,
    [worker kinds]); default ("head", ["trainer", "rollout"]). Each node offers 1 logical CPU
    (Ray's counts; the actors ask fractions) and a 256 MB object store, so 4 nodes fit 2 cores.

    A module that runs after the session's private cluster (`ray_cluster`) was started disconnects
    from it (stopping it) and starts a new private one afterwards, so later tests still have one;
    a watchdog stops the nodes if pytest dies."""
    import ray

    from actors import multinode
    from actors.local_cluster import start_local_cluster

    head_kind, worker_kinds = getattr(request.module, "NODE_KINDS", ("head", ["trainer", "rollout"]))
    had_private_cluster = ray.is_initialized()
    if had_private_cluster:
        ray.shutdown()
    cluster = multinode.start(worker_kinds, head_kind, cpus_per_node=1, object_store_mb=256, watch=True)
    try:
        multinode.connect(cluster)
        yield cluster
    finally:
        ray.shutdown()
        leftovers = multinode.stop(cluster)
        if had_private_cluster:
            start_local_cluster(num_cpus=2)
    assert not leftovers, f"processes left after the nodes stopped: {leftovers}"
