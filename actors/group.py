"""Placement groups and actor groups: where each model role's Ray actors live.

Every role (policy, reference, reward, critic, rollout) gets its own placement group with one
bundle per actor, unless the config colocates roles: then those roles share one placement group
and rank i of each colocated role lands in bundle i (so policy rank 0 and rollout engine 0 share
a GPU, say). Resource amounts come from `ResourcesConfig`; GPUs are used when the cluster has them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf.config import ResourcesConfig, RoleResources
from rlhf.memory import vm_hwm_kib
from rlhf.resources import check_fit, placement_sets, set_node_kind

# Starting an actor or engine (model load, vLLM start-up) is not a step: its own, longer deadline.
START_TIMEOUT_S = 1800.0


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def check_cluster_fits(cfg: ResourcesConfig, roles: list[str]) -> None:
    """Fail at once (ResourceError, naming roles, requests and what the cluster has) if the
    roles' placement groups can never be created on this cluster: a bundle larger than every
    node, or more CPUs/GPUs in all than the cluster has. Compared with the cluster's totals,
    not what is free now (other jobs' resources come back; a missing node does not)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fit(cfg, roles, ray.cluster_resources(), nodes)


def use_cpu_threads_from_env() -> None:
    """Ray gives each actor as many OpenMP threads as its CPU share (1 for fractions). Phases of a
    step run one after another, so on an idle node a big model may use more: RAYLHF_CPU_THREADS=N
    sets torch's thread count in every model actor (trainers and vLLM engines). Tiny models and
    crowded nodes run faster with Ray's default."""
    import torch

    if os.environ.get("RAYLHF_CPU_THREADS") and not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ["RAYLHF_CPU_THREADS"]))


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory (VmHWM, which the kernel keeps, so no spike is missed) of this
    process, MiB; with `children`, plus its child processes' (summed: an upper bound on what they
    held at once), e.g. a vLLM engine's worker processes."""
    import psutil

    me = psutil.Process()
    total_kib = 0
    for p in [me, *(me.children(recursive=True) if children else [])]:
        try:
            total_kib += vm_hwm_kib(Path(f"/proc/{p.pid}/status").read_text()) or 0
        except OSError:  # it ended meanwhile, or this is not Linux
            continue
    return total_kib / 1024


@dataclass
class PlacementPlan:
    """One placement group per role or per colocated set of roles. A role's bundles carry the
    custom resource of its `node_kind` when it has one (rlhf/resources.py), so Ray puts them only
    on nodes of that kind; PACK keeps a group's bundles on as few of those nodes as fit."""

    groups: dict[str, PlacementGroup] = field(default_factory=dict)  # role -> its placement group
    resources: dict[str, RoleResources] = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: ResourcesConfig, roles: list[str], timeout_s: float = 120) -> PlacementPlan:
        check_cluster_fits(cfg, roles)  # an impossible request fails now, not after timeout_s
        plan = cls(resources={role: getattr(cfg, role) for role in roles})
        for members, bundles in placement_sets(cfg, roles):  # bundle i holds rank i of every member role
            pg = placement_group(bundles, strategy="PACK", name=f"rlhf-{'+'.join(members)}")
            if not _ready(pg, timeout_s):
                kind = set_node_kind(cfg, members)
                remove_placement_group(pg)
                plan.shutdown()
                raise RuntimeError(
                    f"placement group for {'+'.join(members)} needs bundles {bundles}, but the cluster "
                    f"({ray.available_resources()} free now) could not provide them within {timeout_s:.0f}s; the "
                    "cluster has enough in total, so other jobs or actors hold them, or the bundles do not pack "
                    "onto its nodes: free them, or lower resources.<role>.num_actors / cpus_per_actor / gpus_per_actor"
                    + (f", or add nodes of kind {kind!r} (resources.<role>.node_kind)" if kind else "")
                )
            for r in members:
                plan.groups[r] = pg
        return plan

    def strategy(self, role: str, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[role],
            placement_group_bundle_index=rank,
            placement_group_capture_child_tasks=True,
        )

    def node_ids(self, role: str) -> list[str]:
        """The distinct nodes (Ray node ids) the role's bundles were placed on, in bundle order."""
        table = ray.util.placement_group_table(self.groups[role])
        return list(dict.fromkeys(table["bundles_to_node_id"][i] for i in sorted(table["bundles_to_node_id"])))

    def shutdown(self) -> None:
        for pg in {id(pg): pg for pg in self.groups.values()}.values():
            remove_placement_group(pg)
        self.groups.clear()


def _ready(pg: PlacementGroup, timeout_s: float) -> bool:
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    return bool(ready)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ActorGroup:
    """The Ray actors of one role, one per rank, with the torch.distributed rendezvous set up.

    `actor_cls` is a plain class (not yet `ray.remote`) whose constructor takes
    `(rank, world_size, master_addr, master_port, rendezvous_dir=..., **init_kwargs)`.

    The rendezvous (torch.distributed's store, where ranks swap their collective addresses):
    - every rank on rank 0's host (a one-machine run, the private local cluster, the local
      multi-node cluster): a FileStore in a fresh private directory (mode 0700) on that host,
      passed as `rendezvous_dir`; the ranks then also bind their collective sockets to loopback.
      Nothing of the group listens beyond 127.0.0.1.
    - ranks on several hosts: torch's env:// TCPStore at rank 0's node address and a free port
      (`master_addr`, `master_port`; `rendezvous_dir` None). That store listens on every
      interface without authentication (Ray's token does not cover it): see README "Security model".
    """

    def __init__(self, actor_cls: type, role: str, plan: PlacementPlan, **init_kwargs):
        self.role = role
        res = plan.resources[role]
        self.world_size = res.num_actors
        remote_cls = ray.remote(actor_cls)

        def start(rank: int, addr: str, port: int):
            return remote_cls.options(
                num_cpus=res.cpus_per_actor,
                num_gpus=res.gpus_per_actor,
                scheduling_strategy=plan.strategy(role, rank),
                name=None,
            ).remote(rank, self.world_size, addr, port, rendezvous_dir=self.rendezvous_dir, **init_kwargs)

        # Rank 0's node hosts the rendezvous. Throwaway tasks placed in the ranks' bundles (zero
        # resources: they must not block a bundle) find out where the ranks will be: rank 0's task
        # gives its node address, a free port and a new private directory; the others say whether
        # they are on that address and see that directory (same host, same filesystem, same user).
        def probe(rank: int, fn, *args) -> ray.ObjectRef:
            return ray.remote(fn).options(num_cpus=0, scheduling_strategy=plan.strategy(role, rank)).remote(*args)

        ((addr, port, directory),) = ray_get(START_TIMEOUT_S, **{role: [probe(0, _rendezvous_host)]})
        peers = [probe(rank, _node_sees, directory) for rank in range(1, self.world_size)]
        seen = ray_get(START_TIMEOUT_S, **{role: peers}) if peers else []
        self.single_host = all(ip == addr and sees for ip, sees in seen)
        if not self.single_host:  # the directory is of no use: remove it (best effort)
            ray_get(START_TIMEOUT_S, **{role: [probe(0, _remove_directory, directory)]})
        self.rendezvous_dir: str | None = directory if self.single_host else None
        self.master_addr, self.master_port = addr, port
        self.actors = [start(rank, addr, port) for rank in range(self.world_size)]

    def async_run(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; one ObjectRef per rank."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def async_scatter(self, method: str, parts: list, **kwargs) -> list[ray.ObjectRef]:
        """Call `method(parts[rank], **kwargs)` on each rank (len(parts) == world_size)."""
        if len(parts) != self.world_size:
            raise ValueError(f"{self.role}: {len(parts)} parts for {self.world_size} ranks")
        return [getattr(a, method).remote(p, **kwargs) for a, p in zip(self.actors, parts)]

    def dead_ranks(self) -> list[int]:
        return dead_ranks(self.actors)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


# How long an actor Ray cannot reach may stay undecided. Its node may have died: Ray declares a node
# dead only after its health checks fail (gcs health_check_period_ms x health_check_failure_threshold,
# 3 s x 5 by default), and until then calls fail with ActorUnavailableError, the placement group
# still counts the node's bundles as placed there, and an actor started in them lands on the dead
# node. Waiting for the verdict lets a restart go to a node that is really there.
UNREACHABLE_VERDICT_S = 120.0


def dead_ranks(actors: list, wait_s: float = 5.0, verdict_s: float = UNREACHABLE_VERDICT_S) -> list[int]:
    """Indices of the actors that have died. A call on a dead actor fails at once; a live one that
    is busy (e.g. stuck in a collective with a dead peer) just does not answer within wait_s. One
    that Ray cannot reach (ActorUnavailableError: its node may be gone) is asked again until Ray
    declares it dead or it answers, for at most verdict_s; still unreachable then, it counts as dead."""
    deadline = time.monotonic() + verdict_s
    dead, undecided = [], list(range(len(actors)))
    while undecided:
        pings = {actors[rank].__ray_ready__.remote(): rank for rank in undecided}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=wait_s)
        undecided = []
        for ping in ready:
            try:
                ray.get(ping, timeout=wait_s)  # answered already: returns or raises at once
            except ray.exceptions.ActorUnavailableError:  # before RayActorError: it is one
                undecided.append(pings[ping])
            except ray.exceptions.RayActorError:
                dead.append(pings[ping])
        if undecided and time.monotonic() > deadline:
            dead += undecided
            break
        if undecided:
            time.sleep(1.0)
    return sorted(dead)


class StepTimeoutError(TimeoutError):
    """Some ranks did not answer within trainer.step_timeout_s (a hang: a stuck collective, a wedged engine)."""


def ray_get(timeout_s: float, **refs_by_role: list[ray.ObjectRef] | dict[int, ray.ObjectRef]) -> list:
    """`ray.get` of every role's refs (in the order given) with a deadline: a StepTimeoutError
    names each role and the ranks (index in its list, or key of its dict) that did not answer
    within timeout_s. A rank that failed raises as soon as its answer arrives, not after its
    peers, which may be stuck in a collective waiting for it.

    The one place the project waits for remote results (tests/unit/test_no_unbounded_ray_get.py
    fails on any other `ray.get` without a timeout): every loop passes trainer.step_timeout_s."""
    if timeout_s is None or not timeout_s > 0:
        raise ValueError(f"ray_get needs a deadline in seconds > 0, got {timeout_s!r}")
    labels = {
        ref: (role, rank)
        for role, refs in refs_by_role.items()
        for rank, ref in (refs.items() if isinstance(refs, dict) else enumerate(refs))
    }
    deadline = time.monotonic() + timeout_s
    values, pending = {}, list(labels)
    while pending:
        left = max(deadline - time.monotonic(), 0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            late: dict[str, list[int]] = {}
            for ref in pending:
                late.setdefault(labels[ref][0], []).append(labels[ref][1])
            names = "; ".join(f"{role} rank(s) {', '.join(map(str, ranks))}" for role, ranks in late.items())
            raise StepTimeoutError(f"{names} did not answer within {timeout_s:g}s (trainer.step_timeout_s)")
        values[ready[0]] = ray.get(ready[0])
    return [values[ref] for ref in labels]


def _rendezvous_host() -> tuple[str, int, str]:
    """On rank 0's node: its address, a free port (for a multi-host TCPStore) and a new directory
    only this user can enter (for a single-host FileStore)."""
    return ray.util.get_node_ip_address(), free_port(), tempfile.mkdtemp(prefix="raylhf-rendezvous-")


def _node_sees(directory: str) -> tuple[str, bool]:
    """On another rank's node: its address, and whether rank 0's private directory is here."""
    path = os.path.realpath(directory)
    ours = os.path.isdir(path) and os.stat(path).st_uid == os.getuid()
    return ray.util.get_node_ip_address(), ours


def _remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
