"""scripts/gpu_check_torch.py runs without a GPU (tiny shapes, --quick) and every row passes or
says why it was skipped; it imports nothing distributed, so it runs on a bare CUDA machine."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import runpy, sys, json
sys.argv = ["gpu_check_torch.py", "--help"]
try:
    runpy.run_path("scripts/gpu_check_torch.py", run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "deepspeed", "vllm", "pydantic", "datasets", "actors"})
print(json.dumps(heavy))
"""


def test_gpu_check_quick_passes_on_cpu(tmp_path):
    out = tmp_path / "table.txt"
    # run as the coordinator will: a file path, the repository root as cwd, no PYTHONPATH needed
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check_torch.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = out.read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert table.strip() in proc.stdout  # the same table on stdout and in --out
    rows = [line for line in table.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert not [r for r in rows if r.startswith("FAIL")], table
    names = " ".join(r.split()[1] + " " + r.split()[2] for r in rows)
    for expected in ("device", "equal fp32", "equal bf16", "speed", "lora"):
        assert expected in names, table
    assert sum(r.split()[:2] == ["PASS", "equal"] for r in rows) == 4, table  # 2 paths x 2 dtypes
    if "cuda" not in table.splitlines()[0].split("device")[-1]:
        assert "cuda: skipped, no GPU" in table
    assert table.rstrip().endswith("s") and "ALL PASSED" in table


def test_gpu_check_imports_nothing_distributed():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
