"""What a run asks the cluster for, and whether the cluster can ever give it (pure: no Ray).

actors/group.py gives every role, or every set of roles colocated by `resources.colocate`, one
placement group with one bundle per actor (bundle i holds rank i of each member role).
`placement_sets` computes those bundles from the config; `fit_problems` compares them with the
cluster before any placement group is created, so a request the cluster can never meet fails at
once, naming the roles, what they ask and what the cluster has, instead of waiting for resources
that will not come.

Node kinds. A role with `resources.<role>.node_kind: <kind>` has NODE_KIND_SHARE of the custom
resource `node_kind:<kind>` added to each of its bundles, so Ray puts them only on nodes that
have that resource (scripts/cluster.sh gives every node `{"node_kind:<kind>": 1}`: room for 1000
bundles). Ray reserves the `node:` prefix (`node:<ip>`), hence `node_kind:`.

Only necessary conditions are checked: every bundle fits on one node (a bundle never spans
nodes; with a node kind, one node of that kind), some node has each kind asked for, and all
bundles together fit the cluster's totals. Whether they also pack onto the nodes together is left
to Ray (the placement-group wait in actors/group.py).
"""

from __future__ import annotations

from rlhf.config import ConfigError, ResourcesConfig, RoleResources

KINDS = ("CPU", "GPU")  # what the config asks for; other node resources (memory, custom) are not requested
NODE_KIND_PREFIX = "node_kind:"
NODE_KIND_SHARE = 0.001  # of node_kind:<kind> per bundle; Ray counts resources in steps of 0.0001
_EPS = 1e-9  # fractional CPUs add up with float error (0.1 + 0.2)


class ResourceError(ConfigError):
    """The run asks for more than the cluster has: it can never start as configured."""


def actor_request(res: RoleResources) -> dict[str, float]:
    """What one actor of a role takes: {"CPU": c} or {"CPU": c, "GPU": g}."""
    bundle = {"CPU": res.cpus_per_actor}
    if res.gpus_per_actor:
        bundle["GPU"] = res.gpus_per_actor
    return bundle


def node_kind_resource(kind: str) -> str:
    """The custom Ray resource that marks a node of this kind: node_kind:<kind>."""
    return NODE_KIND_PREFIX + kind


def node_kinds(node: dict[str, float]) -> list[str]:
    """The kinds of a node, from its resources."""
    return sorted(k[len(NODE_KIND_PREFIX) :] for k, v in node.items() if k.startswith(NODE_KIND_PREFIX) and v > 0)


def set_node_kind(cfg: ResourcesConfig, members: list[str]) -> str | None:
    """The node kind of a placement set: its members' (colocated roles agree, a config check)."""
    return next((k for r in members if (k := getattr(cfg, r).node_kind) is not None), None)


def placement_sets(cfg: ResourcesConfig, roles: list[str]) -> list[tuple[list[str], list[dict[str, float]]]]:
    """(member roles, bundles) of every placement group the run creates, in creation order:
    the colocated sets first, then one per remaining role."""
    colocated: list[list[str]] = [[r for r in group if r in roles] for group in cfg.colocate]
    sets = [g for g in colocated if g] + [[r] for r in roles if not any(r in g for g in colocated)]
    out = []
    for members in sets:
        width = max(getattr(cfg, r).num_actors for r in members)
        bundles = []
        for i in range(width):
            bundle: dict[str, float] = {}
            for r in members:  # bundle i holds rank i of every member role that has one
                if i < getattr(cfg, r).num_actors:
                    for k, v in actor_request(getattr(cfg, r)).items():
                        bundle[k] = bundle.get(k, 0) + v
            if (kind := set_node_kind(cfg, members)) is not None:
                bundle[node_kind_resource(kind)] = NODE_KIND_SHARE
            bundles.append(bundle)
        out.append((members, bundles))
    return out


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{_num(resources.get(k, 0))} {k}" for k in KINDS)


def _num(x: float) -> str:
    return f"{x:g}"


def fit_problems(
    cfg: ResourcesConfig, roles: list[str], total: dict[str, float], nodes: list[dict[str, float]]
) -> list[str]:
    """Why the run's placement groups can never be created on this cluster ([] = they may be).

    total: the cluster's resources (ray.cluster_resources()); nodes: each alive node's resources.
    """
    problems = []
    for members, bundles in placement_sets(cfg, roles):
        kind = set_node_kind(cfg, members)
        eligible = nodes if kind is None else [n for n in nodes if n.get(node_kind_resource(kind), 0) > 0]
        if not eligible:
            assert kind is not None
            present = sorted({k for n in nodes for k in node_kinds(n)})
            problems.append(
                f"{'+'.join(members)}: resources.{members[0]}.node_kind={kind}, but no node of kind {kind!r} is up "
                f"(node kinds in the cluster: {', '.join(present) or 'none'}; {len(nodes)} node(s)); a node's kind "
                f"is its custom resource {node_kind_resource(kind)} (scripts/cluster.sh up --workers {kind},...; "
                f"or resources in cluster.yaml), or unset resources.{members[0]}.node_kind"
            )
            continue
        largest = {k: max((n.get(k, 0) for n in eligible), default=0) for k in KINDS}
        bad = [b for b in bundles if not any(all(b.get(k, 0) <= n.get(k, 0) + _EPS for k in KINDS) for n in eligible)]
        if not bad:
            continue
        worst = max(bad, key=lambda b: tuple(b.get(k, 0) for k in reversed(KINDS)))
        per_role = "; ".join(f"{r}: {_amounts(actor_request(getattr(cfg, r)))} per actor" for r in members)
        together = f" (colocated: {per_role}, summed into one bundle per rank)" if len(members) > 1 else ""
        short = [k for k in KINDS if worst.get(k, 0) > largest[k] + _EPS]
        where = "node" if kind is None else f"node of kind {kind!r}"
        fields = " / ".join(
            f"resources.{r}.{'gpus' if k == 'GPU' else 'cpus'}_per_actor"
            for r in members
            for k in short
            if actor_request(getattr(cfg, r)).get(k, 0) > 0
        )
        what = f"lower {fields}" if fields else "lower the per-actor requests"
        problems.append(
            f"{'+'.join(members)}: one actor's bundle asks {_amounts(worst)}{together}, but no {where} has that much "
            f"(the largest {where} has {', '.join(f'{_num(largest[k])} {k}' for k in KINDS)}; {len(eligible)} node(s)"
            f"{'' if kind is None else ' of that kind'}); "
            f"{what}{' or colocate fewer roles' if len(members) > 1 else ''}, or add a larger node"
        )
    asked = {k: 0.0 for k in KINDS}
    for _, bundles in placement_sets(cfg, roles):
        for b in bundles:
            for k in KINDS:
                asked[k] += b.get(k, 0)
    for k in KINDS:
        have = total.get(k, 0)
        if asked[k] > have + _EPS:
            field = "gpus_per_actor" if k == "GPU" else "cpus_per_actor"
            parts = ", ".join(
                f"{r} {getattr(cfg, r).num_actors} x {_num(actor_request(getattr(cfg, r)).get(k, 0))} {k}"
                for r in roles
                if actor_request(getattr(cfg, r)).get(k, 0) > 0
            )
            hint = " (fractions such as 0.5 are allowed)" if k == "CPU" else ""
            problems.append(
                f"the run asks for {_num(asked[k])} {k} in all ({parts}), but the cluster has {_num(have)} {k} "
                f"({len(nodes)} node(s)); lower resources.<role>.num_actors or {field}{hint}, "
                f"or use a larger cluster"
            )
    return problems


def check_fit(cfg: ResourcesConfig, roles: list[str], total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError listing every reason the run cannot be placed on this cluster."""
    problems = fit_problems(cfg, roles, total, nodes)
    if problems:
        raise ResourceError(
            "the cluster cannot hold this run's actors (nothing was started):\n  "
            + "\n  ".join(problems)
            + "\n  (checked against the nodes up now: on an autoscaling cluster, start the nodes the run "
            "needs first, e.g. min_workers in cluster.yaml)"
        )
