"""cluster.yaml is a valid Ray cluster-launcher config, and every recipe fits its node types.

No Ray is started and no cloud is called: the config goes through the same functions `ray up`
runs first (`prepare_config` fills Ray's AWS defaults, `validate_config` checks the result
against the JSON schema inside the ray package), and each recipe's resource requests are packed
onto the declared node types the way its placement groups ask for them.
"""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rlhf.config import ROLES, RunConfig, load_config
from rlhf.resources import fit_problems, placement_sets

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
RECIPES = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
# What cluster.yaml tells users to add on a GPU cluster: one GPU per actor of every role.
GPU_OVERRIDES = [f"resources.{role}.gpus_per_actor=1" for role in ROLES]


def raw_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ------------------------------------------------------------------------ what a run asks for
def roles_of(cfg: RunConfig) -> list[str]:
    """The roles a run starts. Mirrors the PlacementPlan.create calls in actors/coordinator.py
    (RL), actors/supervised.py (SFT) and actors/preference.py (DPO, reward model)."""
    name, algo = cfg.algorithm.name, cfg.algorithm
    if name == "sft":
        return ["policy", "rollout"]  # rollout only when held-out rows have answers: count it always
    if name == "reward_model":
        return ["reward"]
    if name == "dpo":  # with a reward model, held-out samples are generated and scored too
        return ["policy", "reference"] + (["rollout", "reward"] if cfg.models.reward else [])
    roles = ["policy", "rollout"]
    roles += ["reference"] if algo.kl.coef > 0 else []
    roles += ["critic"] if algo.advantage_estimator.needs_critic else []
    roles += ["reward"] if cfg.models.reward else []
    return roles


def bundles_of(cfg: RunConfig) -> list[dict[str, float]]:
    """Every placement-group bundle the run asks for, as actors/group.py creates them."""
    return [{"CPU": 0, "GPU": 0, **b} for _, bundles in placement_sets(cfg.resources, roles_of(cfg)) for b in bundles]


# ---------------------------------------------------------------------------- what the cluster has
def node_types(cluster: dict) -> dict[str, dict[str, float]]:
    return {name: {"CPU": 0, "GPU": 0, **t["resources"]} for name, t in cluster["available_node_types"].items()}


def nodes_at_max(cluster: dict) -> list[dict[str, float]]:
    """The head plus every worker type at its max_workers (each node's resources)."""
    types = node_types(cluster)
    nodes = [dict(types[cluster["head_node_type"]])]
    for name, t in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            nodes += [dict(types[name]) for _ in range(t.get("max_workers", cluster["max_workers"]))]
    return nodes


def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(amount <= node.get(kind, 0) for kind, amount in bundle.items())


def unplaceable(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """Bundles left over after first-fit-decreasing packing onto `nodes` ([] = the run fits).
    A bundle never spans nodes; different bundles may (PACK is a preference, not a rule)."""
    free = [dict(n) for n in nodes]
    left = []
    for bundle in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):
        node = next((n for n in free if fits(bundle, n)), None)
        if node is None:
            left.append(bundle)
            continue
        for kind, amount in bundle.items():
            node[kind] -= amount
    return left


def check_fits(cfg: RunConfig, cluster: dict) -> None:
    """Raise AssertionError naming what does not fit the cluster at max_workers. First the check
    a run makes before it starts actors (rlhf/resources.py: each bundle fits some node, the
    totals fit the cluster), against every node the cluster may have; then whether the bundles
    also pack onto those nodes together (the totals can fit while the pieces do not)."""
    nodes = nodes_at_max(cluster)
    total = {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}
    problems = fit_problems(cfg.resources, roles_of(cfg), total, nodes)
    assert not problems, "\n".join(problems)
    left = unplaceable(bundles_of(cfg), nodes)
    assert not left, f"bundles {left} do not pack onto the cluster at max_workers (all: {bundles_of(cfg)})"


# ------------------------------------------------------------------------------------------ tests
def test_passes_rays_own_validation():
    raw = raw_cluster()
    jsonschema.validate(raw, ray_schema())  # the file as written, before Ray's defaults fill gaps
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks


@pytest.mark.parametrize("breakage", ["fractional GPU", "unknown key", "head type missing"])
def test_validation_rejects_a_broken_config(breakage):
    raw = raw_cluster()
    if breakage == "fractional GPU":  # node resources are integers
        raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown key":
        raw["max_worker"] = 3
    else:
        raw["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))


def test_declares_gpu_workers_dashboard_metrics_token_auth_and_the_gpu_install():
    cluster = raw_cluster()
    types = node_types(cluster)
    assert any(t["GPU"] > 0 for t in types.values())
    for name, t in cluster["available_node_types"].items():
        assert {"CPU", "GPU"} <= set(t["resources"]), f"{name}: declare CPU and GPU for the autoscaler"
    head, worker = " ".join(cluster["head_start_ray_commands"]), " ".join(cluster["worker_start_ray_commands"])
    # the dashboard (job API) on the head's loopback only: `ray dashboard cluster.yaml` forwards it
    assert "--dashboard-host=127.0.0.1" in head and "--dashboard-port=8265" in head
    assert "--metrics-export-port=" in head and "--metrics-export-port=" in worker
    # token authentication on every node, with the token file that file_mounts copies there
    assert "export RAY_AUTH_MODE=token;" in head and "export RAY_AUTH_MODE=token;" in worker
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    assert "disabled" not in CLUSTER_YAML.read_text()
    assert any('pip install -q -e ".[gpu]"' in c for c in cluster["setup_commands"])
    text = CLUSTER_YAML.read_text()
    assert all(o in text for o in GPU_OVERRIDES), "cluster.yaml's GPU overrides and this test's disagree"


@pytest.mark.parametrize("variant", ["as shipped", "gpu"])
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_the_cluster(recipe, variant):
    cfg = load_config(recipe, GPU_OVERRIDES if variant == "gpu" else [])
    if variant == "gpu":
        assert all(b["GPU"] >= 1 for b in bundles_of(cfg))
    check_fits(cfg, raw_cluster())


def test_fit_check_rejects_what_does_not_fit():
    cluster, sft = raw_cluster(), ROOT / "recipes" / "configs" / "sft.yaml"
    per_node = max(t["GPU"] for t in node_types(cluster).values())
    # one actor wider than any node
    too_wide = load_config(sft, GPU_OVERRIDES + [f"resources.policy.gpus_per_actor={per_node + 1}"])
    with pytest.raises(AssertionError, match="no node has that much"):
        check_fits(too_wide, cluster)
    # every actor fits a node, but together they need more GPUs than max_workers nodes have
    ranks = sum(n["GPU"] for n in nodes_at_max(cluster))  # + the rollout engine: one too many
    too_many = load_config(
        sft,
        GPU_OVERRIDES
        + [f"resources.policy.num_actors={ranks}", "trainer.micro_batch_size=1", f"trainer.global_batch_size={ranks}"],
    )
    with pytest.raises(AssertionError, match="GPU in all"):
        check_fits(too_many, cluster)
    # the totals fit, but a node holds only one of these bundles and there are too few nodes
    workers = len(nodes_at_max(cluster)) - 1
    share = per_node / 2 + 0.5  # more than half a node: two never share one
    assert (workers + 1) * share <= workers * per_node
    fragmented = load_config(
        sft,
        [
            f"resources.policy.num_actors={workers + 1}",
            f"resources.policy.gpus_per_actor={share}",
            "trainer.micro_batch_size=1",
            f"trainer.global_batch_size={workers + 1}",
        ],
    )
    with pytest.raises(AssertionError, match="do not pack"):
        check_fits(fragmented, cluster)
