#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: a head plus worker nodes, each a real `ray start`
# node with its own CPUs and a node kind (custom resource node_kind:<kind>), token authentication
# on, every port on 127.0.0.1. See actors/multinode.py and the README's "Several nodes".
#
#   scripts/cluster.sh up [--workers trainer,rollout] [--head-kind head] [--cpus-per-node 1]
#   eval "$(scripts/cluster.sh env)"    # this shell's clients join it (RAY_ADDRESS, the token file)
#   scripts/cluster.sh status
#   scripts/cluster.sh down             # stops exactly the nodes `up` started (never `ray stop`)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m actors.multinode "$@"
