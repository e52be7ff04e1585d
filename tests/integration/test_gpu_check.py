"""scripts/gpu_check.py on a machine without a GPU: the rows a CPU allows pass, every GPU row says
"no GPU" and where its CPU side is tested, the table on stdout is the one in --out, and a failing
row makes the exit status 1. (On a GPU machine the first test checks the same table shape.)"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # imports vLLM and DeepSpeed in child processes (~30 s)

ROOT = Path(__file__).resolve().parents[2]
GPU_ROWS = ["vllm engine", "vllm sleep", "sync objstore", "sync nccl", "zero2 bf16", "rlvr 3 steps"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of(table: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) for the rows of gpu_check.py itself (the torch rows come after)."""
    out = {}
    for line in table.splitlines():
        if line[:5] in ("PASS ", "FAIL ", "SKIP "):
            name, detail = line[6:28].strip(), line[29:]
            out.setdefault(name, (line[:4], detail))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU table")
def test_gpu_check_on_cpu_runs_what_cpu_allows(tmp_path):
    out = tmp_path / "table.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    table = out.read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert table.strip() in proc.stdout  # the same table on stdout and in --out
    assert table.splitlines()[0].startswith("gpu_check: 0 GPU(s)")
    rows = rows_of(table)
    status, detail = rows["device"]
    assert status == "PASS" and detail.startswith("no GPU: cpu") and "preferred_dtype=" in detail, table
    for name in ("stack", "rlvr config"):  # run on CPU too: API drift and a bad GPU config show up here
        assert rows[name][0] == "PASS", table
    for name in GPU_ROWS:
        status, detail = rows[name]
        assert status == "SKIP" and detail.startswith("no GPU; "), table
    assert "tests/integration/test_engine_sleep.py" in rows["vllm sleep"][1]
    # the pure-torch rows follow, at tiny sizes, and pass
    assert "pure-torch rows: scripts/gpu_check_torch.py --quick" in table
    assert "equal fp32 shared" in table and "lora grads" in table
    assert not [line for line in table.splitlines() if line.startswith("FAIL")], table
    assert table.splitlines()[-1].startswith("PASSED (with skips): ") and " 0 fail, " in table.splitlines()[-1]


def test_a_failing_row_fails_the_check(monkeypatch, capsys):
    gpu_check = load_script()

    def broken(table):
        raise RuntimeError("no device here")

    monkeypatch.setattr(gpu_check, "check_device", broken)
    assert gpu_check.main(["--only", "device"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  device                 RuntimeError: no device here" in out
    assert out.splitlines()[-1].startswith("FAILED: 0 pass, 1 fail")


def test_rows_past_the_budget_are_skipped_not_run(capsys):
    gpu_check = load_script()
    assert gpu_check.main(["--only", "stack,config,torch", "--budget-s", "0"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert {n: s for n, (s, _) in rows.items()} == {"stack": "SKIP", "rlvr config": "SKIP", "torch": "SKIP"}
    assert all("out of the time budget" in d for _, d in rows.values())


def test_nccl_row_needs_two_gpus_and_says_why(monkeypatch):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 1)
    (row,) = gpu_check.row_nccl()
    assert row["status"] == "SKIP" and "needs 2 GPUs" in row["detail"] and "Duplicate GPU detected" in row["detail"]


def test_unknown_row_is_refused(capsys):
    gpu_check = load_script()
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--only", "devise"])
    assert stop.value.code == 2 and "unknown rows ['devise']" in capsys.readouterr().err
