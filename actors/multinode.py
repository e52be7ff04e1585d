"""A Ray cluster of several real nodes on this machine: a head and worker nodes, each started with
`ray start` (its own raylet, object store, CPUs), each marked with the custom resource
`node_kind:<kind>` that `resources.<role>.node_kind` places roles by (rlhf/resources.py).

    python -m actors.multinode up [--workers trainer,rollout] [--head-kind head] [--cpus-per-node 1]
    eval "$(python -m actors.multinode env)"      # RAY_ADDRESS, token auth, loopback, for clients
    python -m actors.multinode status
    python -m actors.multinode down

(`scripts/cluster.sh` runs these.) What every cluster gets, as actors/local_cluster.py's private one:
- token authentication with a fresh 256-bit token in `<root>/auth_token` (mode 0600), handed to
  the nodes as RAY_AUTH_TOKEN_PATH; clients use the same file (`env` prints how);
- every port on 127.0.0.1 (Ray's local-only switch) and chosen free at start, never Ray's
  defaults (6379, 8265, ... may belong to another Ray on the machine); workers take OS-chosen ports;
- its own folder `<root>` = /tmp/raylhf-n*/ (mode 0700): the token, one Ray temp dir per node
  (`<root>/n0` is the head: logs under n0/session_latest/logs), `cluster.json` (what `down` reads);
- `down` stops exactly its nodes: the recorded `ray start --block` processes (each stops what it
  started) and then, as a safety net, any process of this user with a file open under `<root>`
  (actors/local_cluster.stop_cluster). Never `ray stop`, which stops every Ray on the machine.
- Grafana: the head's dashboard writes Ray's dashboards and provisioning under its session's
  metrics/grafana; RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR points that provisioning at
  `<root>/grafana-dashboards`, where the raylhf dashboard (grafana/raylhf_dashboard.json) is
  copied first, so a Grafana started with Ray's grafana.ini shows it next to Ray's own.

Losing a node: `kill_node` SIGKILLs every process of one worker node at once (its raylet, agents
and the actors' workers), as a machine that dies would; tests/integration/test_node_loss.py shows
what a run then does (README "Several nodes", "Losing a node").
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from actors.local_cluster import LOCAL_ONLY_SWITCH, LOOPBACK, start_watchdog, stop_cluster
from rlhf.resources import node_kind_resource

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
DASHBOARD_JSON = REPO / "grafana" / "raylhf_dashboard.json"
GRAFANA_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"  # read by Ray's dashboard (metrics_head.py)
STATE_FILE = Path(os.environ.get("RAYLHF_CLUSTER_STATE", Path.home() / ".cache" / "raylhf" / "local-cluster.json"))
NODE_PORTS = ("node_manager", "object_manager", "metrics", "agent_http", "agent_grpc", "runtime_env")
HEAD_PORTS = ("gcs", "dashboard", "client")
STARTED = "Ray runtime started"  # what `ray start` prints when the node is up


@dataclass
class Node:
    kind: str
    num_cpus: int
    temp_dir: str
    ports: dict[str, int]
    pid: int = 0  # the `ray start --block` process
    started: float = 0.0  # its create_time: a reused pid is not it

    @property
    def log(self) -> Path:
        return Path(self.temp_dir) / "ray_start.log"


@dataclass
class NodeCluster:
    root: str
    token_path: str
    nodes: list[Node] = field(default_factory=list)  # nodes[0] is the head
    watchdog_pid: int = 0  # 0: none (the CLI's cluster outlives the command that started it)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:  # GCS: RAY_ADDRESS for drivers
        return f"{LOOPBACK}:{self.head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:  # the dashboard and job API: `ray job submit --address`
        return f"http://{LOOPBACK}:{self.head.ports['dashboard']}"

    def client_env(self) -> dict[str, str]:
        """What a client (driver, `ray job submit`, `ray status`) needs to join this cluster."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            LOCAL_ONLY_SWITCH: "0",
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> NodeCluster:
        raw = json.loads(path.read_text())
        return cls(**raw | {"nodes": [Node(**n) for n in raw["nodes"]]})


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# `ray start` for a worker node that stays on loopback. Ray's local-only switch (what keeps every
# address at 127.0.0.1) also makes `ray start` refuse to join a cluster ("Multi-node Ray clusters
# are not supported on Windows and OSX"), and with the switch on it rewrites the head's address
# 127.0.0.1 into this machine's routable address, where the loopback-only head does not listen.
# So this process runs Ray's own CLI with joining allowed and "this machine's address" answered as
# 127.0.0.1; the node's other processes inherit the switch (LOCAL_ONLY_SWITCH=0) and stay local.
RAY_START_LOOPBACK_WORKER = (
    "import sys; from ray._private import ray_constants, services; "
    "ray_constants.ENABLE_RAY_CLUSTER = True; "
    f"services.node_ip_address_from_perspective = lambda address=None: {LOOPBACK!r}; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def node_command(node: Node, cluster: NodeCluster, head: bool, object_store_mb: int | None) -> list[str]:
    p = node.ports
    cmd = [
        *([RAY] if head else [sys.executable, "-I", "-c", RAY_START_LOOPBACK_WORKER]),
        "start",
        "--block",  # stays in the foreground: its pid is the node's handle, SIGTERM stops the node
        f"--num-cpus={node.num_cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps({node_kind_resource(node.kind): 1})}",
        "--disable-usage-stats",
        f"--temp-dir={node.temp_dir}",
        f"--node-ip-address={LOOPBACK}",
        f"--node-manager-port={p['node_manager']}",
        f"--object-manager-port={p['object_manager']}",
        f"--metrics-export-port={p['metrics']}",
        f"--dashboard-agent-listen-port={p['agent_http']}",
        f"--dashboard-agent-grpc-port={p['agent_grpc']}",
        f"--runtime-env-agent-port={p['runtime_env']}",
        "--min-worker-port=0",  # OS-chosen: several raylets on one machine must not share a range
        "--max-worker-port=0",
    ]
    if object_store_mb:
        cmd.append(f"--object-store-memory={object_store_mb * 2**20}")
    if head:
        cmd += [
            "--head",
            f"--port={p['gcs']}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={p['dashboard']}",
            f"--ray-client-server-port={p['client']}",
        ]
    else:
        cmd.append(f"--address={cluster.address}")
    return cmd


def node_env(cluster: NodeCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_TOKEN", "RAY_ADDRESS"))}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": cluster.token_path,
        LOCAL_ONLY_SWITCH: "0",
        GRAFANA_DIR_ENV: str(Path(cluster.root) / "grafana-dashboards"),
    }
    return env


def launch(node: Node, cmd: list[str], env: dict[str, str]) -> None:
    import psutil

    Path(node.temp_dir).mkdir(mode=0o700)
    with open(node.log, "w") as out:
        # own session: a Ctrl-C in the terminal of `up` does not reach the nodes
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    node.pid, node.started = proc.pid, psutil.Process(proc.pid).create_time()


def wait_started(nodes: list[Node], timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    waiting = list(nodes)
    while waiting:
        for node in list(waiting):
            text = node.log.read_text() if node.log.exists() else ""
            if STARTED in text:
                waiting.remove(node)
            elif not psutil.pid_exists(node.pid) or psutil.Process(node.pid).status() == psutil.STATUS_ZOMBIE:
                raise RuntimeError(f"`ray start` of the {node.kind} node exited:\n{text[-3000:]}")
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(
                f"nodes {[n.kind for n in waiting]} not started within {timeout_s:.0f}s; "
                f"log of the first:\n{waiting[0].log.read_text()[-3000:]}"
            )
        time.sleep(0.5)


def start(
    worker_kinds: list[str],
    head_kind: str = "head",
    cpus_per_node: int = 1,
    object_store_mb: int | None = None,
    watch: bool = False,
    timeout_s: float = 180,
) -> NodeCluster:
    """Start the head, then every worker (in parallel), and wait until each is up.
    watch=True: a watchdog stops the cluster when this process ends (the test fixture)."""
    root = Path(tempfile.mkdtemp(prefix="raylhf-n", dir="/tmp"))  # 0700; short: socket paths < 107 bytes
    token_path = root / "auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    grafana = root / "grafana-dashboards"
    grafana.mkdir()
    if DASHBOARD_JSON.exists():
        shutil.copy(DASHBOARD_JSON, grafana / DASHBOARD_JSON.name)
    cluster = NodeCluster(str(root), str(token_path))
    kinds = [head_kind, *worker_kinds]
    ports = iter(free_ports(len(HEAD_PORTS) + len(NODE_PORTS) * len(kinds)))
    for i, kind in enumerate(kinds):
        names = NODE_PORTS + (HEAD_PORTS if i == 0 else ())
        cluster.nodes.append(Node(kind, cpus_per_node, str(root / f"n{i}"), {n: next(ports) for n in names}))
    if watch:
        cluster.watchdog_pid = start_watchdog(root)
    env = node_env(cluster)
    try:
        launch(cluster.head, node_command(cluster.head, cluster, True, object_store_mb), env)
        cluster.save(root / "cluster.json")  # from here on `down` can find what was started
        wait_started([cluster.head], timeout_s)
        for node in cluster.nodes[1:]:
            launch(node, node_command(node, cluster, False, object_store_mb), env)
        cluster.save(root / "cluster.json")
        wait_started(cluster.nodes[1:], timeout_s)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: NodeCluster, remove: bool = True) -> list[int]:
    """Stop this cluster's nodes (workers first, then the head) and whatever is left of them.
    Returns the pids stopped by the safety net (0 expected)."""
    import psutil

    for node in reversed(cluster.nodes):
        if not node.pid:
            continue
        try:
            proc = psutil.Process(node.pid)
            if proc.create_time() != node.started:
                continue  # not ours any more
            family = proc.children(recursive=True)  # taken first: orphans are re-parented
            proc.terminate()  # `ray start --block` then stops what it started
            proc.wait(timeout=30)
        except psutil.TimeoutExpired:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
        _, alive = psutil.wait_procs(family, timeout=15)
        for p in alive:
            p.kill()
    if cluster.watchdog_pid:  # its job is done; it would count as a leftover (the folder is in its command line)
        try:
            psutil.Process(cluster.watchdog_pid).terminate()
            psutil.Process(cluster.watchdog_pid).wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    leftovers = [p for p in stop_cluster(cluster.root) if p != cluster.watchdog_pid]
    if remove:
        shutil.rmtree(cluster.root, ignore_errors=True)
    return leftovers


def kill_node(cluster: NodeCluster, node: Node) -> list[int]:
    """SIGKILL every process of this worker node at once, without warning anyone: its `ray start`,
    its raylet and agents, and the actors' worker processes it started (each logs under the node's
    own temp dir). What a machine that loses power does to a run. Returns the pids killed.
    The head is refused: losing it ends the cluster (Ray's GCS lives there)."""
    import psutil

    from actors.local_cluster import cluster_processes

    if node is cluster.head:
        raise ValueError("kill_node: the head node holds the cluster's GCS; kill a worker node")
    family: list[psutil.Process] = []
    try:
        proc = psutil.Process(node.pid)
        if proc.create_time() == node.started:  # still our `ray start`, not a reused pid
            family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass

    def kill(procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    kill(family)  # first: the scan below (every process's open files) takes a while
    family += (rest := [p for p in cluster_processes(node.temp_dir) if p.pid not in {f.pid for f in family}])
    kill(rest)
    psutil.wait_procs(family, timeout=10)
    return [p.pid for p in family]


def node_with_id(cluster: NodeCluster, node_id: str) -> Node:
    """The node of this cluster that Ray knows as `node_id` (matched by its raylet's port)."""
    import ray

    port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
    return next(n for n in cluster.nodes if n.ports["node_manager"] == port)


def connect(cluster: NodeCluster) -> None:
    """Join this process to the cluster as a driver (token auth, loopback)."""
    from actors.local_cluster import join_cluster

    os.environ.pop("RAY_AUTH_TOKEN", None)  # e.g. another cluster's, set by start_local_cluster
    os.environ.update({k: v for k, v in cluster.client_env().items() if k != "RAY_ADDRESS"})
    join_cluster(cluster.address)


def nodes_by_kind() -> dict[str, list[str]]:
    """{kind: [node id, ...]} of the alive nodes of the cluster this process is connected to."""
    import ray

    from rlhf.resources import node_kinds

    out: dict[str, list[str]] = {}
    for n in ray.nodes():
        if n.get("Alive"):
            for kind in node_kinds(n["Resources"]) or ["(none)"]:
                out.setdefault(kind, []).append(n["NodeID"])
    return out


# ------------------------------------------------------------------------------------- the CLI
def usage(cluster: NodeCluster) -> str:
    env = " ".join(f"{k}={v}" for k, v in cluster.client_env().items())
    kinds = ", ".join(f"{n.kind} ({n.num_cpus} CPU)" for n in cluster.nodes)
    return (
        f"Ray cluster up: {len(cluster.nodes)} nodes: {kinds}; token auth, every port on {LOOPBACK}\n"
        f"  token:     {cluster.token_path} (mode 0600)\n"
        f"  dashboard: {cluster.dashboard_url} (asks for the token once: cat {cluster.token_path})\n"
        f"  logs:      {cluster.root}/n<i>/session_latest/logs (n0 = head)\n"
        f'clients:  eval "$(scripts/cluster.sh env)"   # sets {env}\n'
        f"  then:   .venv/bin/python -m recipes.rlvr resources.policy.node_kind=trainer "
        f"resources.rollout.node_kind=rollout\n"
        f"  or:     ray job submit --address {cluster.dashboard_url} --working-dir . -- python -m recipes.rlvr ...\n"
        f"stop:     scripts/cluster.sh down"
    )


def load_running(state: Path) -> NodeCluster:
    if not state.exists():
        raise SystemExit(f"no cluster recorded in {state}: scripts/cluster.sh up starts one")
    return NodeCluster.load(state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/cluster.sh", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes on this machine")
    up.add_argument("--workers", default="trainer,rollout", help="worker node kinds, comma-separated (one node each)")
    up.add_argument("--head-kind", default="head", help="the head node's kind")
    up.add_argument(
        "--cpus-per-node", type=int, default=1, help="logical CPUs each node offers (Ray counts, not cores)"
    )
    up.add_argument("--object-store-mb", type=int, default=512, help="object store size per node")
    sub.add_parser("down", help="stop the nodes `up` started (only those)")
    sub.add_parser("status", help="the nodes, their kinds and whether they are alive")
    sub.add_parser("env", help='print export lines for clients: eval "$(scripts/cluster.sh env)"')
    args = ap.parse_args(argv)
    state = STATE_FILE
    if args.cmd == "up":
        if state.exists():
            raise SystemExit(f"a cluster is already recorded in {state}: `scripts/cluster.sh down` first")
        workers = [k for k in args.workers.split(",") if k]
        cluster = start(workers, args.head_kind, args.cpus_per_node, args.object_store_mb)
        state.parent.mkdir(parents=True, exist_ok=True)
        cluster.save(state)
        print(usage(cluster))
    elif args.cmd == "env":
        for k, v in load_running(state).client_env().items():
            print(f"export {k}={v}")
    elif args.cmd == "down":
        cluster = load_running(state)
        leftovers = stop(cluster)
        state.unlink()
        print(f"stopped {len(cluster.nodes)} node(s) of {cluster.root}" + (f"; then {leftovers}" if leftovers else ""))
    elif args.cmd == "status":
        import psutil

        cluster = load_running(state)
        for i, n in enumerate(cluster.nodes):
            alive = psutil.pid_exists(n.pid) and psutil.Process(n.pid).create_time() == n.started
            role = "head" if i == 0 else "worker"
            print(f"{role:6} kind={n.kind:10} cpus={n.num_cpus} pid={n.pid} {'up' if alive else 'DOWN'}")
        connect(cluster)
        for kind, ids in sorted(nodes_by_kind().items()):
            print(f"ray sees kind {kind}: {len(ids)} alive node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
