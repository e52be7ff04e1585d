"""The Ray control plane the project starts is closed: token required, loopback only, no strays.

A driver subprocess starts the project's local cluster through the launcher's own code path
(actors.launch.ensure_ray -> actors/local_cluster.py) and starts one actor, so workers are
covered too. The tests then, from outside that cluster:
- send it the requests an attacker on the machine would (a job through the node's job API over
  HTTP, a gRPC call to its GCS) without the token, with a wrong one, and with the right one;
- list every listening TCP socket of every process of the cluster and require loopback, and try
  each of those ports on the machine's other addresses;
- do the same for a head started with `ray start --head` as the README says (tests/conftest.py
  `ray_head`), Ray Client server included;
- SIGKILL the driver and require that no process of its cluster is left.
"""

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import psutil
import pytest

from actors.local_cluster import cluster_processes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WRONG = "0" * 64

DRIVER = r"""
import json, os, sys
import ray
from actors.launch import ensure_ray

cluster = ensure_ray()
@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()
probe = Probe.remote()
node = next(n for n in ray.nodes() if n["Alive"])
print(json.dumps({"temp_dir": str(cluster.temp_dir), "watchdog": cluster.watchdog_pid,
                  "token": os.environ["RAY_AUTH_TOKEN"], "gcs": ray.get_runtime_context().gcs_address,
                  "agent_http": node["DashboardAgentListenPort"], "runtime_env_agent": node["RuntimeEnvAgentPort"],
                  "worker": ray.get(probe.pid.remote())}), flush=True)
sys.stdin.readline()
"""


def start_driver() -> tuple[subprocess.Popen, dict]:
    # no RAY_ADDRESS: a fresh local cluster; no token of ours: the cluster must make its own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env |= {"PYTHONPATH": str(ROOT), "RAYLHF_RAY_HOST": "127.0.0.1"}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = driver.stdout.readline()
    if not line:
        driver.kill()
        raise AssertionError(f"driver exited: {driver.stderr.read()[-3000:]}")
    return driver, json.loads(line)


def end_driver(driver: subprocess.Popen, info: dict) -> None:
    if driver.poll() is None:
        driver.stdin.close()  # lets it exit normally
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
    gone = wait_until(lambda: not cluster_processes(info["temp_dir"]), 40)
    assert gone, f"left behind: {describe(cluster_processes(info['temp_dir']))}"
    shutil.rmtree(info["temp_dir"], ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    driver, info = start_driver()
    try:
        yield driver, info
    finally:
        end_driver(driver, info)


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's bookkeeping remains)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (the cluster's processes all descend from its driver or
    its `ray start`)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(procs) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of these processes."""
    out = []
    for p in procs:
        try:
            out += [
                (p.name(), c.laddr.ip, c.laddr.port)
                for c in p.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            pass
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def other_addresses() -> list[str]:
    """This machine's non-loopback addresses (IPv4 and global/unique-local IPv6)."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if (
                a.family in (socket.AF_INET, socket.AF_INET6)
                and not is_loopback(a.address)
                and not ipaddress.ip_address(a.address.split("%")[0]).is_link_local
            ):
                out.append(a.address)
    return out


def reachable(address: str, port: int) -> bool:
    family_ = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family_, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


def assert_loopback_only(processes, must_include: set[str]) -> list[tuple[str, str, int]]:
    """Every listening socket of the processes `processes()` returns is on loopback and none is
    reachable on another address; each process named in must_include is among the listeners
    (agents start seconds after their raylet: wait up to 60 s for them)."""

    def missing(sockets) -> list[str]:
        names = {name for name, _, _ in sockets}
        return [want for want in must_include if not any(want in name for name in names)]

    wait_until(lambda: not missing(listening(processes())), 60)
    sockets = listening(processes())
    assert not missing(sockets), (
        f"no listening socket of {missing(sockets)} among {sockets}: the process list is incomplete"
    )
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    open_elsewhere = [(a, port) for a in other_addresses() for _, _, port in sockets if reachable(a, port)]
    assert not open_elsewhere, f"reachable on a non-loopback address: {open_elsewhere}"
    return sockets


def http_status(url: str, data: bytes | None = None, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def gcs_call(address: str, token: str | None):
    """GetAllNodeInfo on the GCS, as any gRPC client can send it: the status code name, or OK."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(),
                timeout=10,
                metadata=[("authorization", f"Bearer {token}")] if token else None,
            )
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


# ----------------------------------------------------------------------------------------- tests
def test_local_cluster_refuses_requests_without_the_token(local_cluster, tmp_path):
    _, info = local_cluster
    assert gcs_call(info["gcs"], None) == "UNAUTHENTICATED"
    assert gcs_call(info["gcs"], WRONG) == "UNAUTHENTICATED"
    assert gcs_call(info["gcs"], info["token"]) == "OK"

    # the runtime-env agent installs packages on request: HTTP, token required
    runtime_env = f"http://127.0.0.1:{info['runtime_env_agent']}/get_or_create_runtime_env"
    assert http_status(runtime_env, b"{}") == 401
    assert http_status(runtime_env, b"{}", WRONG) == 403
    assert http_status(runtime_env, b"{}", info["token"]) not in (401, 403)

    # the node's job API (the dashboard agent's HTTP server) runs any command it is sent. Ray gives
    # it the fixed port 52365 and goes without it when another Ray holds that port (as the test
    # session's own cluster does in a full run); then there is nothing of ours there to attack.
    if info["agent_http"] <= 0:
        holders = [
            c.pid for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == 52365
        ]
        assert holders, "the node's job API did not start, yet port 52365 is free"
        warnings.warn(
            f"port 52365 is held by pid {holders}: this cluster has no job API to test; "
            "run tests/safety alone to cover it",
            stacklevel=2,
        )
        return
    jobs = f"http://127.0.0.1:{info['agent_http']}/api/job_agent/jobs/"
    refused, accepted = tmp_path / "ran_without_token", tmp_path / "ran_with_token"

    def submit(marker: Path, token: str | None) -> int:
        return http_status(jobs, json.dumps({"entrypoint": f"touch {marker}"}).encode(), token)

    assert submit(refused, None) == 401
    assert submit(refused, WRONG) == 403
    assert submit(accepted, info["token"]) == 200
    assert wait_until(accepted.exists, 60), "the job submitted with the token did not run"
    assert not refused.exists()


def test_joining_without_the_token_says_what_to_set(local_cluster, tmp_path):
    _, info = local_cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"RAY_ADDRESS": info["gcs"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}  # no ~/.ray/auth_token
    out = subprocess.run(
        [sys.executable, "-c", "from actors.launch import ensure_ray; ensure_ray()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "RAY_AUTH_MODE=token" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr, out.stderr[-2000:]


def test_local_cluster_listens_on_loopback_only(local_cluster):
    driver, info = local_cluster

    def processes() -> list[psutil.Process]:
        return list({p.pid: p for p in family(driver.pid) + cluster_processes(info["temp_dir"])}.values())

    assert info["worker"] in {p.pid for p in processes()}, (
        "the probe actor's worker is not among the cluster's processes"
    )
    sockets = assert_loopback_only(processes, {"gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"})
    assert len(sockets) >= 8, sockets  # GCS, raylet x2, agents, driver and worker core workers, ...


def test_ray_start_head_listens_on_loopback_only(ray_head):
    sockets = assert_loopback_only(
        lambda: family(ray_head.proc.pid), {"gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"}
    )
    ports = {port for _, _, port in sockets}
    for name in ("gcs", "dashboard", "client", "agent_http", "metrics", "node_manager", "object_manager"):
        assert ray_head.ports[name] in ports, f"{name} port {ray_head.ports[name]} is not listening: {sockets}"
    assert http_status(f"{ray_head.dashboard}/api/jobs/") == 401
    assert http_status(f"{ray_head.dashboard}/api/jobs/", token=ray_head.token) == 200
    assert gcs_call(ray_head.gcs, None) == "UNAUTHENTICATED"


def test_sigkilled_driver_leaves_no_process_behind():
    driver, info = start_driver()
    try:
        before = [p for p in family(driver.pid) + cluster_processes(info["temp_dir"]) if p.pid != driver.pid]
        assert len(before) >= 5, describe(before)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        # Ray alone leaves its dashboard and runtime-env agents alive (measured: over 60 s)
        assert wait_until(lambda: not any(alive(p) for p in before), 30), (
            f"still alive 30 s after SIGKILL: {describe(p for p in before if alive(p))}"
        )
        assert not cluster_processes(info["temp_dir"])
        try:
            watchdog = psutil.Process(info["watchdog"])
            assert wait_until(lambda: not alive(watchdog), 10), "the watchdog did not exit"
        except psutil.NoSuchProcess:
            pass  # already gone
    finally:
        end_driver(driver, info)


def test_trainer_group_listens_on_loopback_only(ray_cluster, tiny_model):
    """A 2-rank ZeRO-2 trainer group, all on this host: its rendezvous is a file in a private
    directory (torch's env:// TCPStore would listen on `::`, every interface, without
    authentication) and its gloo connections bind 127.0.0.1. Checked after a training step, on
    every listening socket of both rank processes."""
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor
    from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig
    from tests.integration.test_trainers import random_batch

    plan = PlacementPlan.create(ResourcesConfig(policy={"num_actors": 2, "cpus_per_actor": 0.5}), ["policy"])
    try:
        group = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=ModelSpec(path=tiny_model, dtype="float32").model_dump(),
            trainer=TrainerConfig(zero_stage=2, global_batch_size=8, micro_batch_size=2).model_dump(),
            algorithm=AlgorithmConfig(name="grpo").model_dump(),
        )
        assert group.single_host and group.rendezvous_dir
        assert oct(os.stat(group.rendezvous_dir).st_mode & 0o777) == "0o700"
        batch = random_batch()
        batch["advantages"] = batch["response_mask"].float()
        metrics = ray_cluster.get(group.async_scatter("train_step", batch.chunk(2), normalizer=1.0), timeout=600)
        assert len(metrics) == 2
        pids = ray_cluster.get([a.__ray_call__.remote(lambda actor: os.getpid()) for a in group.actors], timeout=60)
        sockets = listening([psutil.Process(pid) for pid in pids])
        assert sockets, "the ranks listen on nothing: gloo's connection sockets were expected"
        exposed = [s for s in sockets if not is_loopback(s[1])]
        assert not exposed, f"trainer ranks listening beyond loopback: {exposed}"
        assert group.master_port not in {port for _, _, port in sockets}, "an env:// TCPStore is listening"
        open_elsewhere = [(a, port) for a in other_addresses() for _, _, port in sockets if reachable(a, port)]
        assert not open_elsewhere, f"reachable on a non-loopback address: {open_elsewhere}"
    finally:
        plan.shutdown()
