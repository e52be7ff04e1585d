"""A recipe submitted as a Ray job, the way a cluster runs it (README: "Submitting a job").

The test starts its own head node (`ray start --head --block`, its own ports and temp dir: it
does not touch the session's `ray_cluster` fixture or any other Ray on the machine), submits
`python -m recipes.sft` with the repository as `working_dir` through `JobSubmissionClient`, and
checks the job's logs and run directory. The job's driver is a separate process on that head; the
pytest process never calls `ray.init`.

It stops the head by ending the `ray start --block` process it started (which takes its raylet,
GCS, dashboard and workers down with it), never with `ray stop`: that kills every Ray on the
machine, including other tests' clusters.
"""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 3
ROWS = [{"prompt": f"{a} + {b} =", "response": str(a + b)} for a in range(8) for b in range(8)]


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def head_node():
    """A private head node; yields (a JobSubmissionClient for it, its `ray start` log)."""
    # Short path: Ray's unix sockets live under the temp dir and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a private test cluster, as in tests/conftest.py
    log_path = Path(temp_dir) / "ray_start.log"
    # Every port is given: the defaults (6379, 8265, 10001, 52365, ...) may belong to another Ray.
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    try:
        yield connect(f"http://127.0.0.1:{dashboard}", proc, log_path), log_path
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs: a failed assertion above quotes their tail


def stop_head(proc: subprocess.Popen) -> None:
    import psutil

    # Everything this head started (GCS, raylet, dashboard, agents, workers, the job's driver)
    # descends from the `ray start` process; take the list before it goes, since orphans are
    # re-parented. Other Rays' processes are never on it.
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()  # `ray start --block` then stops the processes it started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:  # a safety net: in trials SIGTERM left nothing behind
        p.kill()
    psutil.wait_procs(alive, timeout=5)


def connect(address: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90):
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            return JobSubmissionClient(address)
        except Exception:  # the dashboard is not up yet
            if time.time() > deadline:
                raise
            time.sleep(1)


def wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job_id)
            break
        time.sleep(2)
    return status


def test_sft_recipe_runs_as_a_submitted_job(head_node, tmp_path):
    from ray.job_submission import JobStatus

    client, head_log = head_node
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model = build_tiny_causal_lm(tmp_path / "tiny", [f"{r['prompt']} {r['response']}" for r in ROWS])
    # The smallest real SFT run: rows without an `answer` need no vLLM engine for exact match,
    # so the job is the driver plus one DeepSpeed policy actor.
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"policy": {"path": model, "dtype": "float32"}},
        "data": {"source": str(data), "chat_template": "none", "eval_size": 8, "max_prompt_len": 16, "max_response_len": 4},
        "algorithm": {"name": "sft"},
        "trainer": {"zero_stage": 0, "lr": 1e-3, "global_batch_size": 8, "micro_batch_size": 8},
        "resources": {"policy": {"num_actors": 1, "cpus_per_actor": 1}},
        "logging": {"run_name": "job", "tensorboard": False},
    }))
    logs_dir = tmp_path / "runs"
    overrides = [f"trainer.total_steps={STEPS}", f"logging.dir={logs_dir}"]
    # `ls -a` first: the job's working directory is the uploaded copy of the repository, and
    # its listing shows what the upload left out (Ray drops .git and .venv; .gitignore, runs/).
    entrypoint = shlex.join(["ls", "-a"]) + " && " + shlex.join(
        [sys.executable, "-m", "recipes.sft", "--config", str(config), *overrides])

    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
    status = wait_for_job(client, job_id, timeout_s=240)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}; logs:\n{logs[-4000:]}\nhead log:\n{head_log.read_text()[-2000:]}"

    print("\n".join(line for line in logs.splitlines() if " step " in line or "held-out" in line))
    listing = set(logs.splitlines())
    assert {"recipes", "actors", "rlhf", "pyproject.toml"} <= listing
    assert not {".venv", "runs", ".git"} & listing, "the upload should leave out .venv, runs and .git"
    assert "held-out before training" in logs
    assert f"step {STEPS}/{STEPS} | sft_loss" in logs  # the driver's progress lines reach the job logs

    run_dir = logs_dir / "job"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == STEPS and Path(result["final_path"], "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, *range(1, STEPS + 1), STEPS]  # held-out before, each step, held-out after
