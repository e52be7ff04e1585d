"""Connecting to Ray: the one place every entry point (launcher, evaluate, bench, tests) calls.

With `RAY_ADDRESS` set (as under `ray job submit`) the process joins that cluster with token
authentication. Otherwise it starts the project's private local cluster:
- token authentication on, with a fresh random token for this cluster (`RAY_AUTH_TOKEN` in this
  process's environment, which every process of the cluster inherits); any other `RAY_AUTH_MODE`
  is overridden, never honoured;
- every port on loopback (GCS, raylet, object manager, workers, dashboard and runtime-env agents,
  metrics, the dashboard if asked for). Ray turns a node address of 127.0.0.1 into the machine's
  routable address unless its "local-only cluster" switch is off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
  the mode Ray uses on macOS and Windows); with it off, Ray's servers bind 127.0.0.1. Another
  interface: `RAYLHF_RAY_HOST=<ip of this machine>`; Ray's gRPC servers then listen on every
  interface (Ray has no switch for one non-loopback interface), still behind the token;
- its own temp dir (`/tmp/raylhf-*`, mode 0700: logs, sockets, spilled objects), which also names
  the cluster's processes;
- a watchdog process in its own session that waits for this process to end, however it ends
  (SIGKILL included), then stops every process of the cluster: those with a file open under its
  temp dir or the temp dir in their command line. Ray alone leaves the dashboard and runtime-env
  agents running after its driver is SIGKILLed (measured: still alive 60 s later).

This file also runs as that watchdog (`python -I actors/local_cluster.py --watch ...`): it needs
only the standard library and psutil at import time.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("raylhf")

HOST_ENV = "RAYLHF_RAY_HOST"  # the interface a project-started cluster listens on; default loopback
LOOPBACK = "127.0.0.1"
LOCAL_ONLY_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as the node address
TEMP_PREFIX = "raylhf-"  # short: Ray's unix socket paths under the temp dir must fit in 107 bytes

TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and give this process the cluster's token: RAY_AUTH_TOKEN=<token>, "
    "RAY_AUTH_TOKEN_PATH=<file> or the file ~/.ray/auth_token (on the head node, "
    "`ray get-auth-token` prints it)"
)


@dataclass(frozen=True)
class LocalCluster:
    temp_dir: Path  # logs under temp_dir/session_latest/logs
    host: str
    watchdog_pid: int


def init_ray(
    num_cpus: int | None = None, log_to_driver: bool = False, include_dashboard: bool = False
) -> LocalCluster | None:
    """Connect this process to Ray, once: join RAY_ADDRESS's cluster, or start the private local
    cluster (returned; None when joining or already connected)."""
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        join_cluster(address)
        return None
    return start_local_cluster(num_cpus=num_cpus, log_to_driver=log_to_driver, include_dashboard=include_dashboard)


def join_cluster(address: str) -> None:
    """ray.init on the cluster at `address`, with token authentication."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config
    from ray.exceptions import AuthenticationError

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise RuntimeError(
            f"RAY_AUTH_MODE={mode}: raylhf only joins clusters with token authentication; "
            f"start the cluster with RAY_AUTH_MODE=token and {TOKEN_HELP}"
        )
    os.environ["RAY_AUTH_MODE"] = "token"  # unset means off for an explicit address in Ray 2.60
    Config.initialize("")  # Ray caches the mode and the token per process: re-read both
    AuthenticationTokenLoader.instance().reset_cache()  # (this process may have joined another cluster)
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost" or _is_loopback(host):
        _keep_loopback_node_address()  # else this driver looks for a node at the machine's other address
    try:
        ray.init(address=address)
    except AuthenticationError as e:
        raise RuntimeError(f"no Ray authentication token found to join the cluster at {address}: {TOKEN_HELP}") from e
    except ConnectionError as e:
        raise ConnectionError(
            f"{e}. If that cluster is running, this process's token may not be its token: {TOKEN_HELP}"
        ) from e


def start_local_cluster(
    num_cpus: int | None = None, log_to_driver: bool = False, include_dashboard: bool = False
) -> LocalCluster:
    """Start the private local cluster described at the top of this file and connect to it."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    host = os.environ.get(HOST_ENV, LOOPBACK)
    if not _is_ip(host) or ipaddress.ip_address(host).is_unspecified:
        raise ValueError(f"{HOST_ENV}={host!r}: give one IP address of this machine (default {LOOPBACK})")
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: a raylhf local cluster always uses token authentication", mode)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # 256 bits, as `ray get-auth-token --generate`
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)  # this cluster's token only, whatever the user's other ones
    Config.initialize("")  # Ray caches the mode and the token per process: re-read both
    AuthenticationTokenLoader.instance().reset_cache()

    loopback = _is_loopback(host)
    if loopback:
        _keep_loopback_node_address()
    else:
        log.warning(
            "%s=%s: Ray's gRPC servers listen on every interface of this machine (token required)", HOST_ENV, host
        )
    temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))  # 0700
    watchdog = start_watchdog(temp_dir)  # first: a driver killed during ray.init leaves nothing either
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=host,
        log_to_driver=log_to_driver,
        _temp_dir=str(temp_dir),
        **({} if loopback else {"_node_ip_address": host}),
    )
    log.info("local Ray cluster on %s (token authentication; logs in %s/session_latest/logs)", host, temp_dir)
    return LocalCluster(temp_dir, host, watchdog)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_loopback


def _keep_loopback_node_address() -> None:
    """Make this process (and the processes it starts) take 127.0.0.1 as the node's address.
    Ray reads the switch once, at import: set it in the environment for child processes and on
    the already imported constant for this one."""
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_watchdog(temp_dir: Path) -> int:
    """A process that stops every process of the cluster in temp_dir once this process ends
    (also used by actors/multinode.py's test clusters); returns its pid."""
    import psutil

    me = psutil.Process()
    # -I: isolated, so neither PYTHONPATH nor this script's folder can shadow what it imports
    cmd = [
        sys.executable,
        "-I",
        str(Path(__file__).resolve()),
        "--watch",
        str(me.pid),
        repr(me.create_time()),
        str(temp_dir),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}  # it needs no secret
    with open(temp_dir / "watchdog.log", "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
        )  # a signal to the driver's group spares it
    return proc.pid


# --------------------------------------------------------------------------- the watchdog process
def cluster_processes(temp_dir: str | Path) -> list:
    """This user's processes that belong to the cluster with this temp dir: a file open under it
    (Ray's processes log there; workers and agents rename themselves, so their command lines do
    not always show it) or the temp dir in the command line. Never another cluster's."""
    import psutil

    root = str(temp_dir).rstrip("/") + "/"
    found = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        try:
            if p.pid == os.getpid() or p.info["uids"] is None or p.info["uids"].real != os.getuid():
                continue
            if any(root in arg or arg == root[:-1] for arg in p.info["cmdline"] or []) or any(
                f.path.startswith(root) for f in p.open_files()
            ):
                found.append(p)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def stop_cluster(temp_dir: str | Path, timeout_s: float = 30) -> list[int]:
    """SIGTERM every process of the cluster, SIGKILL what is left 3 s later; again until none is
    found (a dying raylet may still start a worker) or timeout_s passes. Returns the pids stopped."""
    import psutil

    deadline, stopped = time.monotonic() + timeout_s, []
    while (procs := cluster_processes(temp_dir)) and time.monotonic() < deadline:
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=3)
        stopped += [p.pid for p in procs]
    return stopped


def watch(driver_pid: int, driver_created: float, temp_dir: str) -> None:
    """Wait for the driver to end (a zombie counts as ended; a reused pid is not the driver),
    then stop its cluster."""
    import psutil

    while True:
        try:
            driver = psutil.Process(driver_pid)
            if driver.create_time() != driver_created or driver.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    stopped = stop_cluster(temp_dir)
    print(
        f"{time.strftime('%H:%M:%S')} driver {driver_pid} ended; stopped {len(stopped)} process(es) "
        f"of the cluster in {temp_dir}: {stopped}",
        flush=True,
    )


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--watch":
    watch(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
