"""A recipe submitted as a Ray job, the way a cluster runs it (README: "Submitting a job").

The test starts its own head node (tests/conftest.py `ray_head`: `ray start --head --block` with
token authentication, on 127.0.0.1, its own ports and temp dir: it does not touch the session's
`ray_cluster` fixture or any other Ray on the machine), shows that a submission without the token
is refused, submits `python -m recipes.sft` with the token and the repository as `working_dir`
through `JobSubmissionClient`, and checks the job's logs and run directory. The job's driver is a
separate process on that head (it joins the cluster with the token the head's processes inherit);
the pytest process never calls `ray.init`.
"""

import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
ROWS = [{"prompt": f"{a} + {b} =", "response": str(a + b)} for a in range(8) for b in range(8)]


@pytest.fixture
def head_node(ray_head):
    """The conftest's private head (token auth, loopback); yields (a JobSubmissionClient that sends
    the token, the head's `ray start` log)."""
    from ray.job_submission import JobSubmissionClient

    # An explicit Authorization header: this process may hold another cluster's token (the
    # session's ray_cluster), and Ray's client would otherwise send that one.
    yield JobSubmissionClient(ray_head.dashboard, headers=ray_head.auth), ray_head.log_path


def wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job_id)
            break
        time.sleep(2)
    return status


def post_job(url: str, entrypoint: str, headers: dict) -> int:
    """The HTTP status of a raw job submission (what `ray job submit` sends)."""
    request = urllib.request.Request(
        f"{url}/api/jobs/",
        data=json.dumps({"entrypoint": entrypoint}).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def test_sft_recipe_runs_as_a_submitted_job(head_node, ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client, head_log = head_node
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model = build_tiny_causal_lm(tmp_path / "tiny", [f"{r['prompt']} {r['response']}" for r in ROWS])
    # The smallest real SFT run: rows without an `answer` need no vLLM engine for exact match,
    # so the job is the driver plus one DeepSpeed policy actor.
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {"policy": {"path": model, "dtype": "float32"}},
                "data": {
                    "source": str(data),
                    "chat_template": "none",
                    "eval_size": 8,
                    "max_prompt_len": 16,
                    "max_response_len": 4,
                },
                "algorithm": {"name": "sft"},
                "trainer": {"zero_stage": 0, "lr": 1e-3, "global_batch_size": 8, "micro_batch_size": 8},
                "resources": {"policy": {"num_actors": 1, "cpus_per_actor": 1}},
                "logging": {"run_name": "job", "tensorboard": False},
            }
        )
    )
    logs_dir = tmp_path / "runs"
    overrides = [f"trainer.total_steps={STEPS}", f"logging.dir={logs_dir}"]
    # `ls -a` first: the job's working directory is the uploaded copy of the repository, and
    # its listing shows what the upload left out (Ray drops .git and .venv; .gitignore, runs/).
    entrypoint = (
        shlex.join(["ls", "-a"])
        + " && "
        + shlex.join([sys.executable, "-m", "recipes.sft", "--config", str(config), *overrides])
    )

    # Without the token (or with a wrong one) the job API refuses, and nothing runs.
    intruder = tmp_path / "ran_without_token"
    assert post_job(ray_head.dashboard, f"touch {intruder}", {}) == 401
    assert post_job(ray_head.dashboard, f"touch {intruder}", {"Authorization": "Bearer " + "0" * 64}) == 403

    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
    status = wait_for_job(client, job_id, timeout_s=240)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, (
        f"job {status}; logs:\n{logs[-4000:]}\nhead log:\n{head_log.read_text()[-2000:]}"
    )

    print("\n".join(line for line in logs.splitlines() if " step " in line or "held-out" in line))
    listing = set(logs.splitlines())
    assert {"recipes", "actors", "rlhf", "pyproject.toml"} <= listing
    assert not {".venv", "runs", ".git"} & listing, "the upload should leave out .venv, runs and .git"
    assert "held-out before training" in logs
    assert f"step {STEPS}/{STEPS} | sft_loss" in logs  # the driver's progress lines reach the job logs

    assert [j.submission_id for j in client.list_jobs()] == [job_id] and not intruder.exists()

    run_dir = logs_dir / "job"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == STEPS and Path(result["final_path"], "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, *range(1, STEPS + 1), STEPS]  # held-out before, each step, held-out after
