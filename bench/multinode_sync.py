"""Benchmark: weight sync from the policy trainer on one Ray node to a vLLM engine on another.

    .venv/bin/python -m bench.multinode_sync [--model smollm2|tiny] [--repeats 3]

Starts two `ray start` nodes on this machine (actors/multinode.py: a head of kind trainer, a worker
of kind rollout), places the policy (DeepSpeed) on the trainer node and the engine on the rollout
node by `resources.<role>.node_kind`, and times the sync the runs use: rank 0 gathers its weights
into a blob in its node's object store, the engine's load_weights takes the ObjectRef, so Ray
copies the blob across the nodes, and vLLM loads it; then the same sync by gloo broadcast
(rollout.weight_sync=broadcast, actors/weight_broadcast.py) and vLLM's load alone. Also times a raw transfer of the same number
of bytes between the two nodes' object stores. Prints medians of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bench.rollout_and_sync import model_path
from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, RolloutConfig, TrainerConfig

TIMEOUT_S = 600


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from actors import multinode
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor
    from actors.rollout import RolloutGroup

    path = model_path(args.model)
    cluster = multinode.start(["rollout"], head_kind="trainer", cpus_per_node=1, object_store_mb=2048, watch=True)
    try:
        multinode.connect(cluster)
        resources = ResourcesConfig(
            policy={"cpus_per_actor": 0.5, "node_kind": "trainer"},
            rollout={"cpus_per_actor": 0.5, "node_kind": "rollout"},
        )
        plan = PlacementPlan.create(resources, ["policy", "rollout"])
        spec = ModelSpec(path=path, dtype="float32").model_dump()
        trainer = TrainerConfig(zero_stage=2, global_batch_size=1, micro_batch_size=1).model_dump()
        policy = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=spec,
            trainer=trainer,
            algorithm=AlgorithmConfig(name="grpo", advantage="grpo").model_dump(),
        )
        rollout = RolloutGroup(plan, path, "float32", RolloutConfig(), max_model_len=512)
        nodes = {kind: ids[0] for kind, ids in multinode.nodes_by_kind().items()}
        assert plan.node_ids("policy") == [nodes["trainer"]] and plan.node_ids("rollout") == [nodes["rollout"]]

        def gather() -> ray.ObjectRef:
            (blob,) = policy.async_run("weights_blob")
            ray.wait([blob], fetch_local=False, timeout=TIMEOUT_S)
            return blob

        def sync() -> None:
            (blob,) = policy.async_run("weights_blob")
            ray.get(rollout.async_load_weights(blob), timeout=TIMEOUT_S)

        nbytes = ray.get(gather(), timeout=TIMEOUT_S).nbytes
        gather_s = median_s(gather, args.repeats)
        sync_s = median_s(sync, args.repeats)
        local = gather()
        ray.get(rollout.async_load_weights(local), timeout=TIMEOUT_S)  # now also in the rollout node's store
        load_s = median_s(lambda: ray.get(rollout.async_load_weights(local), timeout=TIMEOUT_S), args.repeats)
        assert rollout.broadcasts_weights()  # rollout.weight_sync=auto: the engine is on another node
        broadcast_s = median_s(lambda: rollout.sync_from(policy), args.repeats)  # the first call forms the group

        @ray.remote(num_cpus=0)
        def make(n: int) -> np.ndarray:
            return np.ones(n, dtype=np.uint8)

        @ray.remote(num_cpus=0)
        def fetch(refs: list) -> float:
            start = time.perf_counter()
            ray.get(refs, timeout=TIMEOUT_S)
            return time.perf_counter() - start

        def on(kind: str) -> NodeAffinitySchedulingStrategy:
            return NodeAffinitySchedulingStrategy(nodes[kind], soft=False)

        def raw() -> float:
            ref = make.options(scheduling_strategy=on("trainer")).remote(nbytes)
            ray.wait([ref], fetch_local=False, timeout=TIMEOUT_S)
            return ray.get(fetch.options(scheduling_strategy=on("rollout")).remote([ref]), timeout=TIMEOUT_S)

        raw_s = statistics.median([raw() for _ in range(args.repeats + 1)][1:])
        gb = nbytes / 1e9
        print(
            f"cross-node weight sync, {args.model} fp32, {nbytes / 2**20:.0f} MiB, trainer node -> rollout node "
            f"(median of {args.repeats}): whole sync {sync_s:.2f} s = {gb / sync_s:.3f} GB/s "
            f"(rank-0 gather into its object store {gather_s:.2f} s; the rest, transfer + vLLM load, "
            f"{sync_s - gather_s:.2f} s); raw object-store transfer of as many bytes between the nodes "
            f"{raw_s:.2f} s = {gb / raw_s:.2f} GB/s; vLLM's load alone (weights already on its node) {load_s:.2f} s; "
            f"whole sync by gloo broadcast (rollout.weight_sync=broadcast: pack on rank 0, broadcast, vLLM load) "
            f"{broadcast_s:.2f} s = {gb / broadcast_s:.3f} GB/s, of which broadcast + pack "
            f"{broadcast_s - load_s:.2f} s",
            flush=True,
        )
        policy.kill()
        rollout.kill()
        plan.shutdown()
    finally:
        ray.shutdown()
        multinode.stop(cluster)


if __name__ == "__main__":
    main()
