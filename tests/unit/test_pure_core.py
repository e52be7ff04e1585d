"""`rlhf/` is a pure library: importing every module in it must not import ray, deepspeed or vllm."""

import json
import subprocess
import sys

PROBE = """
import importlib, json, pkgutil, sys
import rlhf
names = [m.name for m in pkgutil.walk_packages(rlhf.__path__, "rlhf.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "deepspeed", "vllm"})
print(json.dumps({"modules": names, "heavy": heavy}))
"""


def test_importing_rlhf_pulls_in_no_distributed_runtime():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert "rlhf.config" in found["modules"] and "rlhf.algos" in found["modules"]
    assert found["heavy"] == [], f"rlhf imported {found['heavy']}"
