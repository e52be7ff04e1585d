"""Several real Ray nodes on this machine (tests/conftest.py's multinode_cluster): a ZeRO-3 policy
with its two ranks on two nodes, then whole nodes lost mid-run.

The cluster: a head (kind head) and four workers, two of kind trainer and two of kind rollout,
1 logical CPU each. The second node of each kind is where the lost node's roles go: a run places
each role by `resources.<role>.node_kind`, so a role can only move to a node of its kind.
Losing a node = SIGKILL of every process of that node at once (its raylet, agents and the actors'
workers: actors/multinode.kill_node), as a machine that dies.

- ZeRO-3 across two nodes: one GRPO update with the ranks on two trainer nodes gives the loss,
  gradient norm, log-probs and weights of the same update with both ranks on one node.
- A rollout node lost as step 2's prompts are sent to its engine: the engine is re-created in its placement-group
  bundle, which Ray moves to the other rollout node, loaded with the policy's current weights, and
  the lost shard's prompts are generated again with the same seeds; no run-level restart.
- A trainer node lost during step 2's update: the run shuts every group down, builds them again
  (the policy now on the other trainer node) and resumes from step 1's checkpoint.
"No sample lost, none counted twice": the step that lost the node returns exactly n samples of
each of its prompts; every step is logged once with all 16 samples; the prompts drawn from the
training stream after each step are 4, 8, 12 (a prompt drawn again or skipped would shift them).

The tests run in this order and use up the spare nodes: the ZeRO-3 test needs both trainer
nodes, the rollout test leaves one rollout node, the trainer test one trainer node.
"""

import json
import logging
import time
from collections import Counter

import pytest
import torch
from test_reliability import rl_config  # the same small GRPO run (tests/integration/test_reliability.py)
from test_trainers import one_update

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODE_KINDS = ("head", ["trainer", "trainer", "rollout", "rollout"])  # head kind, worker kinds: one node each
STEPS, PROMPTS, N = 3, 4, 4  # 4 prompts x 4 samples per step
PLACEMENT = {
    "resources.policy.node_kind": "trainer",
    "resources.rollout.node_kind": "rollout",
    "trainer.total_steps": STEPS,
}


def actor_node(actor) -> str:
    """The Ray node id an actor runs on (Ray's state API)."""
    from ray.util.state import get_actor

    return get_actor(actor._actor_id.hex(), timeout=60).node_id


def kind_of(cluster, node_id: str) -> str:
    from actors.multinode import node_with_id

    return node_with_id(cluster, node_id).kind


def step_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "samples" in r]


def assert_every_sample_once(rows) -> None:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["samples"] for r in rows] == [PROMPTS * N] * STEPS  # samples lost: 0
    assert [r["data/prompts_drawn"] for r in rows] == [PROMPTS * s for s in range(1, STEPS + 1)]


def test_zero3_with_ranks_on_two_nodes_matches_one_node(multinode_cluster, tiny_model):
    import ray

    # one node: both ranks on the head (0.25 CPU each); two nodes: 0.6 CPU each cannot share a 1-CPU node
    one = one_update(ray, tiny_model, 3, 2, node_kind="head", cpus_per_actor=0.25)
    two = one_update(ray, tiny_model, 3, 2, node_kind="trainer", cpus_per_actor=0.6)
    assert len(one[5]) == 1 and len(two[5]) == 2, (one[5], two[5])
    assert {kind_of(multinode_cluster, n) for n in two[5]} == {"trainer"}
    (loss1, norm1, batch, after1, state1, _), (loss2, norm2, _, after2, state2, _) = one, two
    mask = batch["response_mask"].bool()
    assert (after1 - batch["old_logprobs"])[mask].abs().max() > 1e-3, "the update changed nothing"
    # tolerances of tests/integration/test_trainers.py (fp32, reduction order may differ)
    assert loss2 == pytest.approx(loss1, abs=1e-5)
    assert norm2 == pytest.approx(norm1, rel=1e-4)
    assert torch.allclose(after2[mask], after1[mask], atol=1e-3), (after2 - after1)[mask].abs().max()
    assert state1.keys() == state2.keys()
    worst = max(float((state2[n] - state1[n]).abs().max()) for n in state1)
    assert worst < 1e-3, worst
    print(
        f"\nZeRO-3, 2 ranks: loss {loss1:.6f} (one node) vs {loss2:.6f} (two nodes); largest weight difference {worst:.2e}"
    )


def test_losing_the_rollout_node_mid_generation(multinode_cluster, tiny_model, tmp_path, monkeypatch, caplog):
    from actors.launch import run
    from actors.multinode import kill_node, node_with_id
    from actors.rollout import RolloutGroup

    cluster = multinode_cluster
    submit, collect, restart = RolloutGroup.async_generate_shard, RolloutGroup.collect, RolloutGroup.restart
    calls, killed, collected, new_nodes = [], {}, [], []

    def kill_the_engines_node_in_step_2(self, i, prompts, sampling, environment=None):
        # Step 2's prompts go to an engine whose node has just died (killed right before they are
        # sent: the tiny model generates them in a few ms, so killing after would race them).
        if len(calls) == 1:
            node = actor_node(self.workers[i])
            killed.update(kind=kind_of(cluster, node), node=node, pids=kill_node(cluster, node_with_id(cluster, node)))
            killed["at"] = time.monotonic()
        calls.append(i)
        return submit(self, i, prompts, sampling, environment)

    def counted_collect(self, prompts, sampling, refs, weights_from=None, environment=None):
        samples, seconds = collect(self, prompts, sampling, refs, weights_from, environment)
        collected.append((time.monotonic(), Counter(s["prompt_index"] for s in samples)))
        return samples, seconds

    def restart_and_locate(self, ranks, weights_from=None):
        restart(self, ranks, weights_from)
        new_nodes.extend(actor_node(self.workers[i]) for i in ranks)

    monkeypatch.setattr(RolloutGroup, "async_generate_shard", kill_the_engines_node_in_step_2)
    monkeypatch.setattr(RolloutGroup, "collect", counted_collect)
    monkeypatch.setattr(RolloutGroup, "restart", restart_and_locate)
    cfg = rl_config(tmp_path, tiny_model, "rollout-node", **PLACEMENT)
    with caplog.at_level(logging.WARNING):
        result = run(cfg)

    assert killed["kind"] == "rollout" and killed["pids"]
    # the engine was re-created on the other rollout node, once
    assert len(new_nodes) == 1 and new_nodes[0] != killed["node"] and kind_of(cluster, new_nodes[0]) == "rollout"
    assert "rollout worker 0 died during generation" in caplog.text
    assert result["steps"] == STEPS and result["restarts"] == 0  # handled in place: no run-level restart
    # step 2's generation, which lost its node: every prompt's n samples, none twice
    assert [dict(c) for _, c in collected] == [{p: N for p in range(PROMPTS)}] * STEPS
    rows = step_rows(tmp_path / "rollout-node")
    assert_every_sample_once(rows)
    assert [r["rollout/worker_restarts"] for r in rows] == [0, 1, 0]
    recovered_s = collected[1][0] - killed["at"]
    print(
        f"\nrollout node lost in step 2: samples lost {STEPS * PROMPTS * N - sum(r['samples'] for r in rows)}; "
        f"node killed -> step 2's samples complete on the other rollout node in {recovered_s:.1f} s"
    )


def test_losing_the_trainer_node_mid_update(multinode_cluster, tiny_model, tmp_path, monkeypatch, caplog):
    from actors.group import ActorGroup
    from actors.launch import run
    from actors.multinode import kill_node, node_with_id
    from actors.rl_loop import RLLoop

    cluster = multinode_cluster
    scatter, load_state = ActorGroup.async_scatter, RLLoop.load_state
    updates, killed, resumed = [], {}, {}

    def kill_the_policy_node_at_update_2(self, method, parts, **kwargs):
        node = actor_node(self.actors[0]) if self.role == "policy" and method == "train_step" else None
        refs = scatter(self, method, parts, **kwargs)
        if node:
            updates.append(node)
            if len(updates) == 2:  # step 2's update, after step 1's checkpoint
                killed.update(kind=kind_of(cluster, node), node=node)
                killed["pids"] = kill_node(cluster, node_with_id(cluster, node))
                killed["at"] = time.monotonic()
        return refs

    def load_and_locate(self, folder, state):
        load_state(self, folder, state)
        resumed.update(at=time.monotonic(), node=actor_node(self.coordinator.policy.actors[0]))

    monkeypatch.setattr(ActorGroup, "async_scatter", kill_the_policy_node_at_update_2)
    monkeypatch.setattr(RLLoop, "load_state", load_and_locate)
    cfg = rl_config(tmp_path, tiny_model, "trainer-node", **PLACEMENT)
    with caplog.at_level(logging.INFO):
        result = run(cfg)

    run_dir = tmp_path / "trainer-node"
    assert killed["kind"] == "trainer" and killed["pids"]
    # "policy rank 0 died during step 2 (ActorDiedError)" once Ray has declared the node dead; before
    # that, the call's own error ("... during step 2 (ActorUnavailableError)")
    assert " during step 2 (" in caplog.text and "restarting every actor group" in caplog.text
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000001'}: step 1 done, continuing at step 2" in caplog.text
    assert resumed["node"] != killed["node"] and kind_of(cluster, resumed["node"]) == "trainer"
    assert result["steps"] == STEPS and result["restarts"] == 1
    assert len(updates) == 4  # steps 1, 2 (node lost), 2 again, 3
    assert_every_sample_once(step_rows(run_dir))
    print(
        f"\ntrainer node lost in step 2: samples lost {STEPS * PROMPTS * N - sum(r['samples'] for r in step_rows(run_dir))}; "
        f"node killed -> groups rebuilt on the other trainer node and step 1's checkpoint loaded in "
        f"{resumed['at'] - killed['at']:.1f} s"
    )
