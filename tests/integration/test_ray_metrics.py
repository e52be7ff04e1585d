"""RayMetrics end to end: gauges set in a Ray *driver* reach the node's Prometheus endpoint.

The driver runs in a subprocess with a Ray of its own, started the way a local run starts one
(actors/local_cluster.py: token authentication, loopback only), because this process may already
be attached to the session's cluster and the export interval must be set before Ray starts
(RAY_metrics_report_interval_ms; Ray floors it at 1 s, the default is 10 s). The subprocess logs
one step, waits for a line on stdin, logs a second; the test reads the endpoint after each, the
way Prometheus would scrape it, and again seconds later: Ray forgets a gauge series that is not
re-reported every export interval, so RayMetrics must keep re-reporting between steps. Ray's
Prometheus endpoint takes no token (Prometheus scrapes it); the node's other HTTP APIs do.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import json, sys
import ray
from actors.local_cluster import init_ray
from actors.metrics import RayMetrics

cluster = init_ray(num_cpus=1)
node = next(n for n in ray.nodes() if n["Alive"])
port, runtime_env_agent = node["MetricsExportPort"], node["RuntimeEnvAgentPort"]
sink = RayMetrics("metrics-test", default_role="coordinator")
steps = [
    {"reward/mean": 0.25, "reward/std": 0.5, "reward/accuracy": 0.25, "reward_errors/accuracy": 3.0, "kl": 0.125,
     "policy_loss": -0.5, "value_loss": 1.5, "samples": 8.0, "response_length/mean": 4.0,
     "time/generate": 2.0, "time/train": 4.0, "time/sync": 0.5, "mismatch/mean_abs_logprob_diff": 0.01, "lr": 1e-05},
    {"reward/mean": 0.75, "reward/std": 0.5, "reward/accuracy": 0.75, "reward_errors/accuracy": 0.0, "kl": 0.25,
     "policy_loss": -0.25, "value_loss": 1.0, "samples": 8.0, "response_length/mean": 4.0,
     "time/generate": 1.0, "time/train": 4.0, "time/sync": 0.25, "mismatch/mean_abs_logprob_diff": 0.02, "lr": 1e-05},
]
for step, metrics in enumerate(steps, start=1):
    sink.log(step, metrics)
    print(json.dumps({"port": port, "runtime_env_agent": runtime_env_agent, "temp_dir": str(cluster.temp_dir), "step": step}), flush=True)
    sys.stdin.readline()  # the test has read this step back
sink.close()
ray.shutdown()
"""

SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)(?: \d+)?$")  # name{labels} value [timestamp]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(metric name, {label: value} minus Ray's own labels): value} of every raylhf series."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1).startswith("ray_raylhf_"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            labels = {k: v for k, v in labels.items() if k in {"run", "role", "function", "phase", "stat", "name"}}
            out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def wait_for(port: int, expect: dict, timeout_s: float = 30) -> dict:
    """Scrape until every expected series shows its expected value (export runs every ~1 s)."""
    deadline, got = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            got = scrape(port)
        except OSError:  # the agent's HTTP server is still starting
            pass
        if all(got.get(k) == pytest.approx(v) for k, v in expect.items()):
            return got
        time.sleep(0.5)
    missing = {k: (v, got.get(k)) for k, v in expect.items() if got.get(k) != pytest.approx(v)}
    raise AssertionError(f"not exported within {timeout_s}s (series: expected, got): {missing}")


def series(gauge, **labels):
    return ("ray_raylhf_" + gauge, frozenset({"run": "metrics-test", **labels}.items()))


def status_without_token(url: str) -> int:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_driver_gauges_reach_the_prometheus_endpoint():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env |= {"RAY_metrics_report_interval_ms": "1000", "PYTHONPATH": str(ROOT)}  # a fresh local Ray, never a shared one
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    temp_dir = None
    try:
        line = driver.stdout.readline()
        assert line, f"driver exited: {driver.stderr.read()[-3000:]}"
        first = json.loads(line)
        port, temp_dir = int(first["port"]), first["temp_dir"]
        # the cluster runs with token authentication: its runtime-env agent (which installs
        # packages on request) refuses a request without one
        runtime_env_url = f"http://127.0.0.1:{first['runtime_env_agent']}/get_or_create_runtime_env"
        assert status_without_token(runtime_env_url) == 401

        got = wait_for(
            port,
            {
                series("step", role="coordinator"): 1,
                series("reward_mean", role="reward"): 0.25,
                series("reward_std", role="reward"): 0.5,
                series("reward_function_mean", role="reward", function="accuracy"): 0.25,
                series("reward_errors", role="reward", function="accuracy"): 3,
                series("kl", role="policy"): 0.125,
                series("policy_loss", role="policy"): -0.5,
                series("value_loss", role="critic"): 1.5,
                series("phase_seconds", role="rollout", phase="generate"): 2.0,
                series("samples_per_second", role="rollout", phase="generate"): 4.0,  # 8 samples / 2 s
                series("tokens_per_second", role="policy", phase="train"): 8.0,  # 8 x 4 tokens / 4 s
                series("weight_sync_seconds", role="rollout"): 0.5,
                series("logprob_mismatch", role="rollout", stat="mean_abs_logprob_diff"): 0.01,
                series("metric", role="coordinator", name="lr"): 1e-5,
            },
        )
        # Prometheus metadata: the gauges are typed and described
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "# TYPE ray_raylhf_reward_mean gauge" in body
        assert series("reward_mean", role="policy") not in got  # tagged with its own role only
        # Ray drops a gauge series not re-reported within 2 export intervals (2 s here); RayMetrics
        # re-reports, so the values stay scrapeable between steps (minutes apart in a real run)
        time.sleep(4)
        assert scrape(port).get(series("reward_mean", role="reward")) == 0.25

        driver.stdin.write("\n")
        driver.stdin.flush()
        assert driver.stdout.readline(), driver.stderr.read()[-3000:]
        wait_for(
            port,
            {  # a gauge shows the latest step's value
                series("step", role="coordinator"): 2,
                series("reward_mean", role="reward"): 0.75,
                series("reward_errors", role="reward", function="accuracy"): 0,
                series("samples_per_second", role="rollout", phase="generate"): 8.0,
                series("weight_sync_seconds", role="rollout"): 0.25,
            },
        )
        driver.stdin.write("\n")
        driver.stdin.flush()
        assert driver.wait(timeout=60) == 0, driver.stderr.read()[-3000:]
    finally:
        if driver.poll() is None:  # closing stdin lets it run on to ray.shutdown(); kill only if that hangs
            driver.stdin.close()
            try:
                driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
