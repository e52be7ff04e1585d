"""Roles on different nodes of a real multi-node Ray (4 `ray start` nodes on this machine, each
with its own raylet and object store; tests/conftest.py's multinode_cluster), placed by
`resources.<role>.node_kind`, and the policy's weights synced from the trainer's node to a vLLM
engine on another node.

Tiny fp32 models, as in test_cycle.py: engine and trainer log-probs agree to ~1e-6 on the same
weights; one lr=1e-2 Adam step moves them by >1e-2, so 1e-4 tells "synced" from "stale".
"""

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import AutoTokenizer

from rlhf.algos import compute_loss_normalizer
from rlhf.batch import collate_samples
from rlhf.config import AlgorithmConfig, ModelSpec, ResourcesConfig, RolloutConfig, TrainerConfig
from rlhf.data.chat import apply_chat_template
from rlhf.resources import ResourceError
from tests.integration.test_cycle import QUESTIONS

pytestmark = pytest.mark.integration
NODE_KINDS = ("trainer", ["reference", "reward", "rollout"])  # head kind, worker kinds: one node each
ROLE_KINDS = {"policy": "trainer", "reference": "reference", "reward": "reward", "rollout": "rollout"}
ACTOR_CLASSES = {"policy": "PolicyActor", "reference": "ReferenceActor", "reward": "RewardActor"}
ATOL = 1e-4
TIMEOUT_S = 300  # every ray.get: engine and DeepSpeed start-up on 2 shared cores included
PROBE_MB = 128  # the raw object-store transfer measured between nodes


@pytest.fixture(scope="module")
def runtime(multinode_cluster, tiny_model):
    from actors.group import ActorGroup, PlacementPlan
    from actors.policy import PolicyActor
    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from actors.rollout import RolloutGroup

    resources = ResourcesConfig(
        **{role: {"cpus_per_actor": 0.25, "node_kind": kind} for role, kind in ROLE_KINDS.items()}
    )
    plan = PlacementPlan.create(resources, list(ROLE_KINDS))
    spec = ModelSpec(path=tiny_model, dtype="float32").model_dump()
    trainer = TrainerConfig(zero_stage=2, global_batch_size=8, micro_batch_size=8, lr=1e-2).model_dump()
    algo = AlgorithmConfig(name="grpo", advantage="grpo").model_dump()
    rt = {"plan": plan}
    try:
        rt["policy"] = ActorGroup(PolicyActor, "policy", plan, model=spec, trainer=trainer, algorithm=algo)
        rt["reference"] = ActorGroup(ReferenceActor, "reference", plan, model=spec, trainer=trainer)
        rt["reward"] = ActorGroup(RewardActor, "reward", plan, model=spec, trainer=trainer)
        rt["rollout"] = RolloutGroup(plan, tiny_model, "float32", RolloutConfig(), max_model_len=256)
        actors = [*rt["policy"].actors, *rt["reference"].actors, *rt["reward"].actors, *rt["rollout"].workers]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=TIMEOUT_S)
        yield rt
    finally:
        for role in ("policy", "reference", "reward", "rollout"):
            if role in rt:
                rt[role].kill()
        plan.shutdown()


def trainer_logprobs(rt, samples, tokenizer):
    """test_cycle.py's helper, with a deadline: the batch and the policy's log-probs of its tokens."""
    batch = collate_samples(
        [s["prompt_token_ids"] for s in samples],
        [s["response_token_ids"] for s in samples],
        tokenizer.pad_token_id,
        {"rollout_logprobs": [s["logprobs"] for s in samples]},
    )
    return batch, ray.get(rt["policy"].async_run("compute_logprobs", batch), timeout=TIMEOUT_S)[0]


def kind_of_node() -> dict[str, str]:
    from actors.multinode import nodes_by_kind

    return {node: kind for kind, nodes in nodes_by_kind().items() for node in nodes}


def test_each_role_runs_on_a_node_of_its_kind(runtime):
    from ray.util.state import list_actors

    kinds = kind_of_node()
    assert sorted(kinds.values()) == ["reference", "reward", "rollout", "trainer"]  # 4 nodes, 1 kind each
    alive = list_actors(filters=[("state", "=", "ALIVE")], timeout=60, raise_on_missing_output=False)
    node_of = {a.class_name: a.node_id for a in alive}
    where = {role: node_of[cls] for role, cls in ACTOR_CLASSES.items()} | {"rollout": node_of["RolloutWorker"]}
    assert {role: kinds[node] for role, node in where.items()} == ROLE_KINDS
    assert len(set(where.values())) == 4  # policy, reference, reward and rollout: four different nodes
    # Ray's placement-group table agrees: every bundle of a role sits on that role's node
    for role, node in where.items():
        assert runtime["plan"].node_ids(role) == [node], role


def engine_vs_trainer(runtime, prompts, tokenizer):
    """Sample on the engine; (samples, batch, the trainer's log-probs, their largest difference)."""
    refs = runtime["rollout"].async_generate(prompts, {"n": 2, "temperature": 1.0, "max_tokens": 8, "seed": 0})
    samples = runtime["rollout"].merge_samples(ray.get(refs, timeout=TIMEOUT_S), len(prompts))
    batch, trainer = trainer_logprobs(runtime, samples, tokenizer)
    m = batch["response_mask"].bool()
    return samples, batch, trainer, (trainer - batch["rollout_logprobs"])[m].abs().max().item()


def update_the_policy(runtime, prompts, tokenizer) -> None:
    """One GRPO update on the trainer's node (rewards differ within each prompt's pair); after it
    the engine, not yet synced, runs stale weights."""
    samples, batch, old_logprobs, diff = engine_vs_trainer(runtime, prompts, tokenizer)
    assert diff < ATOL  # engine and trainer hold the same weights before the update
    scores = torch.tensor([float(i % 2) for i in range(len(samples))])
    mask = batch["response_mask"]
    batch.update(old_logprobs=old_logprobs, advantages=(scores - 0.5)[:, None] * mask)
    norm = float(compute_loss_normalizer(mask, "token_mean"))
    parts = runtime["policy"].async_scatter("train_step", [batch], normalizer=norm)
    (metrics,) = ray.get(parts, timeout=TIMEOUT_S)
    assert np.isfinite(metrics["policy_loss"])
    *_, stale = engine_vs_trainer(runtime, prompts, tokenizer)
    assert stale > 100 * ATOL  # the engine on the rollout node still runs the old weights


def test_weights_synced_across_nodes_make_vllm_match_the_trainer(runtime, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [apply_chat_template(tokenizer, q) for q in QUESTIONS]
    policy, rollout = runtime["policy"], runtime["rollout"]
    update_the_policy(runtime, prompts, tokenizer)

    # the sync: rank 0's blob goes from the trainer node's object store to the rollout node's
    start = time.perf_counter()
    blobs = policy.async_run("weights_blob")
    ray.get(rollout.async_load_weights(blobs[0]) + blobs[1:], timeout=TIMEOUT_S)
    sync_s = time.perf_counter() - start
    *_, fresh = engine_vs_trainer(runtime, prompts, tokenizer)
    assert fresh < ATOL, f"trainer vs vLLM log-probs differ by {fresh} after the cross-node sync"

    blob_bytes = ray.get(blobs[0], timeout=TIMEOUT_S).nbytes
    probe_s = object_store_transfer_s(PROBE_MB)
    print(
        f"\ncross-node weight sync: {blob_bytes / 2**20:.1f} MiB in {sync_s:.2f} s (gather, transfer, vLLM load) "
        f"= {blob_bytes / sync_s / 1e9:.3f} GB/s; raw object-store transfer between the nodes: "
        f"{PROBE_MB} MiB in {probe_s:.2f} s = {PROBE_MB * 2**20 / probe_s / 1e9:.2f} GB/s"
    )


def test_weights_broadcast_across_nodes_and_the_object_store_fallback(runtime, tiny_model, caplog):
    """rollout.weight_sync auto = broadcast here (the engine is on another node than policy rank 0):
    rank 0 sends over a gloo group to the engine. An engine lost makes that sync fall back to the
    object store; once the engine is restarted the group forms again with the new process."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [apply_chat_template(tokenizer, q) for q in QUESTIONS]
    policy, rollout = runtime["policy"], runtime["rollout"]
    assert rollout.weight_sync == "auto" and rollout.broadcasts_weights()

    seconds = []
    with caplog.at_level(logging.INFO, logger="actors.rollout"):
        for _ in range(2):  # the group forms at the first sync and is reused at the second
            update_the_policy(runtime, prompts, tokenizer)
            start = time.perf_counter()
            rollout.sync_from(policy)
            seconds.append(time.perf_counter() - start)
            *_, fresh = engine_vs_trainer(runtime, prompts, tokenizer)
            assert fresh < ATOL, f"trainer vs vLLM log-probs differ by {fresh} after the broadcast"
        assert caplog.text.count("weight broadcast group formed") == 1
        assert "weight broadcast failed" not in caplog.text

        ray.kill(rollout.workers[0])  # an engine lost: this sync cannot broadcast to it
        rollout.sync_from(policy)  # falls back; the dead engine is left for the next generation
        assert "weight broadcast failed, syncing through the object store instead" in caplog.text
        samples = rollout.generate(prompts, {"n": 2, "temperature": 1.0, "max_tokens": 8, "seed": 0}, policy)
        assert rollout.restarts == 1 and len(samples) == 2 * len(prompts)
        *_, fresh = engine_vs_trainer(runtime, prompts, tokenizer)
        assert fresh < ATOL  # restarted with the current weights

        update_the_policy(runtime, prompts, tokenizer)
        rollout.sync_from(policy)  # the restarted engine is a new member: the group forms again
        *_, fresh = engine_vs_trainer(runtime, prompts, tokenizer)
        assert fresh < ATOL
        assert caplog.text.count("weight broadcast group formed") == 2

    nbytes = ray.get(policy.async_run("weights_blob")[0], timeout=TIMEOUT_S).nbytes
    print(
        f"\ncross-node weight broadcast: {nbytes / 2**20:.1f} MiB; first sync (group formed) {seconds[0]:.2f} s, "
        f"second {seconds[1]:.2f} s (gather, broadcast, vLLM load)"
    )


def object_store_transfer_s(mb: int) -> float:
    """Seconds for a task on the rollout node to fetch `mb` MiB put by a task on the trainer node."""
    nodes = {kind: node for node, kind in kind_of_node().items()}

    @ray.remote(num_cpus=0)
    def make(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.uint8)

    @ray.remote(num_cpus=0)
    def fetch(refs: list) -> tuple[int, float]:
        start = time.perf_counter()
        (array,) = ray.get(refs, timeout=TIMEOUT_S)
        return array.nbytes, time.perf_counter() - start

    def on(kind: str) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(nodes[kind], soft=False)

    ref = make.options(scheduling_strategy=on("trainer")).remote(mb * 2**20)
    ray.wait([ref], fetch_local=False, timeout=TIMEOUT_S)
    nbytes, seconds = ray.get(fetch.options(scheduling_strategy=on("rollout")).remote([ref]), timeout=TIMEOUT_S)
    assert nbytes == mb * 2**20
    return seconds


def test_a_node_kind_no_node_has_fails_at_once(multinode_cluster):
    from actors.group import PlacementPlan

    start = time.monotonic()
    with pytest.raises(ResourceError) as err:
        PlacementPlan.create(ResourcesConfig(policy={"cpus_per_actor": 0.25, "node_kind": "gpu"}), ["policy"])
    assert time.monotonic() - start < 10  # not the 120 s placement-group wait
    text = str(err.value)
    assert "resources.policy.node_kind=gpu" in text and "no node of kind 'gpu'" in text
    assert "reference, reward, rollout, trainer" in text


def test_every_node_listens_on_loopback_only_and_wants_the_token(multinode_cluster, runtime):
    from actors.local_cluster import cluster_processes
    from tests.safety.test_control_plane import http_status, is_loopback, listening, other_addresses, reachable

    cluster = multinode_cluster
    sockets = listening(cluster_processes(cluster.root))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), names
    ports = {port for _, _, port in sockets}
    for node in cluster.nodes:  # each node's own raylet and object manager, on the ports it was given
        assert {node.ports["node_manager"], node.ports["object_manager"]} <= ports, (node.kind, sockets)
    # The DeepSpeed groups too: every node is 127.0.0.1, so each group's rendezvous is a file in a
    # private directory, not torch's env:// TCPStore (which would listen on every interface).
    assert all(runtime[role].single_host for role in ACTOR_CLASSES)
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not {runtime[role].master_port for role in ACTOR_CLASSES} & ports, "an env:// TCPStore is listening"
    assert not [(a, p) for a in other_addresses() for p in ports if reachable(a, p)]
    token = Path(cluster.token_path).read_text().strip()
    assert oct(os.stat(cluster.token_path).st_mode & 0o777) == "0o600"
    assert http_status(f"{cluster.dashboard_url}/api/jobs/") == 401
    assert http_status(f"{cluster.dashboard_url}/api/jobs/", token=token) == 200
