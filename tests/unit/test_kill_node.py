"""actors.multinode.kill_node on stand-in processes (no Ray): it SIGKILLs the node's `ray start`
process, everything under it, and whatever else holds a file in the node's temp dir (a worker
re-parented away from the raylet), and nothing else: not a neighbour node's processes, not the head.
The real thing, on a real multi-node Ray, is tests/integration/test_node_loss.py."""

import subprocess
import sys
import time

import psutil
import pytest

from actors.multinode import Node, NodeCluster, kill_node

# a `ray start` stand-in: a child that sleeps (the raylet and its workers)
PARENT = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
# a stray process with a log file open in the node's temp dir (as Ray's workers have)
HOLDS_LOG = "import sys, time; f = open(sys.argv[1], 'w'); time.sleep(600)"


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)


def node_for(proc: subprocess.Popen, kind: str, temp_dir) -> Node:
    temp_dir.mkdir()
    return Node(kind, 1, str(temp_dir), {}, pid=proc.pid, started=psutil.Process(proc.pid).create_time())


def wait_for_children(proc: subprocess.Popen, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 30
    while len(kids := psutil.Process(proc.pid).children(recursive=True)) < n:
        assert time.monotonic() < deadline, "the stand-in did not start its child"
        time.sleep(0.05)
    return kids


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_node_kills_its_processes_and_spares_the_others(tmp_path):
    head, victim, neighbour = start(PARENT), start(PARENT), start(PARENT)
    cluster = NodeCluster(str(tmp_path), str(tmp_path / "token"))
    cluster.nodes = [
        node_for(p, k, tmp_path / k) for p, k in [(head, "head"), (victim, "rollout"), (neighbour, "trainer")]
    ]
    (log_dir := tmp_path / "rollout" / "logs").mkdir()
    stray = start(HOLDS_LOG, str(log_dir / "worker.out"))
    procs = [head, victim, neighbour, stray]
    try:
        victim_child = wait_for_children(victim, 1)[0]
        neighbour_child = wait_for_children(neighbour, 1)[0]
        deadline = time.monotonic() + 30
        while not psutil.Process(stray.pid).open_files():
            assert time.monotonic() < deadline
            time.sleep(0.05)

        killed = kill_node(cluster, cluster.nodes[1])

        assert sorted(killed) == sorted([victim.pid, victim_child.pid, stray.pid])
        assert all(gone(pid) for pid in killed)
        assert head.poll() is None and neighbour.poll() is None and neighbour_child.is_running()
        with pytest.raises(ValueError, match="head node holds the cluster's GCS"):
            kill_node(cluster, cluster.head)
        assert head.poll() is None
    finally:
        for p in procs:
            for child in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []:
                child.kill()
            p.kill()
            p.wait()
