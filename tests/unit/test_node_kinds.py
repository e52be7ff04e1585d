"""resources.<role>.node_kind: the custom resource in the role's bundles and the fail-fast check
when no node of that kind is up (rlhf/resources.py). The placement itself, on a real multi-node
Ray, is in tests/integration/test_multinode.py."""

import pytest

from rlhf.config import ResourcesConfig
from rlhf.resources import ResourceError, check_fit, fit_problems, node_kinds, placement_sets

# a head of kind "head" and two workers, as `scripts/cluster.sh up` starts them
NODES = [
    {"CPU": 1.0, "node_kind:head": 1.0, "node:127.0.0.1": 1.0},
    {"CPU": 1.0, "node_kind:trainer": 1.0},
    {"CPU": 1.0, "node_kind:rollout": 1.0},
]
TOTAL = {"CPU": 3.0, "node_kind:head": 1.0, "node_kind:trainer": 1.0, "node_kind:rollout": 1.0}


def test_a_node_kind_puts_its_resource_in_every_bundle_of_the_role():
    cfg = ResourcesConfig(
        policy={"num_actors": 2, "cpus_per_actor": 0.25, "node_kind": "trainer"},
        rollout={"cpus_per_actor": 0.5, "node_kind": "rollout"},
        reference={"cpus_per_actor": 0.25},
    )
    assert placement_sets(cfg, ["policy", "rollout", "reference"]) == [
        (["policy"], [{"CPU": 0.25, "node_kind:trainer": 0.001}] * 2),
        (["rollout"], [{"CPU": 0.5, "node_kind:rollout": 0.001}]),
        (["reference"], [{"CPU": 0.25}]),  # no kind: any node
    ]
    assert fit_problems(cfg, ["policy", "rollout", "reference"], TOTAL, NODES) == []


def test_colocated_roles_take_the_kind_either_of_them_names():
    cfg = ResourcesConfig(
        policy={"cpus_per_actor": 0.25, "node_kind": "trainer"},
        rollout={"cpus_per_actor": 0.25},
        colocate=[["policy", "rollout"]],
    )
    assert placement_sets(cfg, ["policy", "rollout"]) == [
        (["policy", "rollout"], [{"CPU": 0.5, "node_kind:trainer": 0.001}])
    ]
    with pytest.raises(ValueError, match="different node kinds"):
        ResourcesConfig(
            policy={"node_kind": "trainer"}, rollout={"node_kind": "rollout"}, colocate=[["policy", "rollout"]]
        )


def test_no_node_of_the_kind_fails_at_once_naming_the_field_and_the_kinds_present():
    cfg = ResourcesConfig(policy={"cpus_per_actor": 0.25, "node_kind": "gpu"}, rollout={"cpus_per_actor": 0.25})
    with pytest.raises(ResourceError) as err:
        check_fit(cfg, ["policy", "rollout"], TOTAL, NODES)
    text = str(err.value)
    assert "resources.policy.node_kind=gpu" in text and "no node of kind 'gpu'" in text
    assert "head, rollout, trainer" in text and "node_kind:gpu" in text
    assert "rollout" not in text.split("\n")[1].split(":")[0]  # only the role that asks is named


def test_a_bundle_too_big_for_every_node_of_its_kind_fails_even_if_another_node_is_bigger():
    nodes = [{"CPU": 8.0}, {"CPU": 1.0, "node_kind:trainer": 1.0}]
    cfg = ResourcesConfig(policy={"cpus_per_actor": 2, "node_kind": "trainer"})
    (problem,) = fit_problems(cfg, ["policy"], {"CPU": 9.0}, nodes)
    assert "no node of kind 'trainer' has that much" in problem and "1 node(s) of that kind" in problem


def test_node_kinds_read_from_a_nodes_resources():
    assert node_kinds(NODES[0]) == ["head"]
    assert node_kinds({"CPU": 1.0, "node_kind:a": 1.0, "node_kind:b": 1.0, "node_kind:gone": 0.0}) == ["a", "b"]


def test_node_kind_is_a_plain_name():
    with pytest.raises(ValueError, match="node_kind"):
        ResourcesConfig(policy={"node_kind": "a b"})
