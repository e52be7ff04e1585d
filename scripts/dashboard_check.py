"""A live run on a local multi-node cluster, checked the way a user sees it: Ray's dashboard in a
real (headless) browser, the run's metrics through Prometheus, the Grafana dashboard provisioned.

    python scripts/dashboard_check.py [--screenshots docs] [--out FILE]      (from the repository root)

Needs Debian's `chromium` and `prometheus` (scripts/install_browser_tools.sh). About 2-3 minutes.
What it does, printing one PASS / FAIL line per check (exit status 1 if any fails):
 1. starts a head (kind trainer) and 3 worker nodes (reference, reward, rollout) as
    `scripts/cluster.sh up` does (actors/multinode.py: token auth, every port on 127.0.0.1), and
    Prometheus with the scrape config Ray wrote into the head's session folder;
 2. submits a small GRPO run on tiny random models with `ray job submit` and the cluster's token,
    each role placed on the node of its kind (resources.<role>.node_kind);
 3. once every role's actor is alive and a step has been logged, opens the dashboard in Chromium:
    without the token the API refuses the page; with it (the dashboard's own login: POST
    /api/authenticate sets its cookie) the job's page shows the job running and the actors' page
    shows every role's actor ALIVE on the node of its kind (node ids from Ray's state API);
    screenshots of both go to --screenshots;
 4. queries Prometheus for the run's ray_raylhf_* series and prints them;
 5. checks that Ray's Grafana provisioning (the head's session metrics/grafana) points at a folder
    holding grafana/raylhf_dashboard.json;
 6. stops the job, Prometheus and the nodes (only what it started).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # actors, rlhf, tests.tiny_models
sys.path.insert(0, str(ROOT / "scripts"))  # headless_browser

import yaml  # noqa: E402
from headless_browser import Browser, BrowserError  # noqa: E402

from actors import multinode  # noqa: E402
from actors.group import free_port  # noqa: E402

HEAD_KIND, WORKER_KINDS = "trainer", ["reference", "reward", "rollout"]
ROLE_KINDS = {"policy": "trainer", "reference": "reference", "reward": "reward", "rollout": "rollout"}
ROLE_CLASSES = {
    "policy": "PolicyActor",
    "reference": "ReferenceActor",
    "reward": "RewardActor",
    "rollout": "RolloutWorker",
}
RUN_NAME = "dashboard-check"
QUERIES = [
    "ray_raylhf_step",
    "ray_raylhf_reward_mean",
    "ray_raylhf_kl",
    "ray_raylhf_policy_loss",
    'ray_raylhf_phase_seconds{phase=~"generate|train|sync"}',
    "ray_raylhf_logprob_mismatch",
]
TEXTS = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]


class Checks:
    def __init__(self, out: str | None):
        self.lines: list[str] = []
        self.out = out
        self.failed = False

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.out:
            Path(self.out).write_text("\n".join(self.lines) + "\n")

    def check(self, ok: bool, name: str, detail: str) -> bool:
        self.failed |= not ok
        self.say(f"{'PASS' if ok else 'FAIL':<5} {name:<24} {detail}")
        return ok


def run_config(work: Path, model: str) -> Path:
    """A small GRPO run whose four roles each sit on a node of their own kind; long enough to be
    watched (the check stops it)."""
    cfg = {
        "models": {"policy": {"path": model, "dtype": "float32"}, "reward": {"path": model, "dtype": "float32"}},
        "data": {
            "source": "reasoning_gym:chain_sum",
            "task_kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            "train_size": 64,
            "eval_size": 4,
            "chat_template": "none",
            "max_prompt_len": 64,
        },
        "algorithm": {"name": "grpo", "advantage": "grpo", "kl": {"coef": 0.01}},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 8, "eval_samples": 0},
        "rewards": [{"kind": "reasoning_gym"}, {"kind": "model", "weight": 0.1}],
        "trainer": {"zero_stage": 2, "global_batch_size": 8, "micro_batch_size": 8, "total_steps": 500},
        "resources": {role: {"cpus_per_actor": 0.25, "node_kind": kind} for role, kind in ROLE_KINDS.items()},
        "logging": {"dir": str(work / "runs"), "run_name": RUN_NAME, "tensorboard": False},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def get_json(url: str, token: str | None = None, timeout_s: float = 30):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
        return json.loads(r.read())


def start_prometheus(cluster: multinode.NodeCluster, work: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus with the scrape config Ray wrote for this cluster (its service discovery file lists
    every node's metrics port), its data under `work`, listening on loopback only."""
    config = Path(cluster.head.temp_dir) / "session_latest/metrics/prometheus/prometheus.yml"
    deadline = time.monotonic() + 60
    while not config.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"Ray wrote no Prometheus config at {config}")
        time.sleep(1)
    port = free_port()
    log = open(work / "prometheus.log", "w")  # noqa: SIM115 (open for the process's lifetime)
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def submit(cluster: multinode.NodeCluster, config: Path, submission_id: str) -> str:
    """`ray job submit` with the cluster's token (from the environment `scripts/cluster.sh env` sets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | cluster.client_env()
    cmd = [
        multinode.RAY,
        "job",
        "submit",
        "--no-wait",
        f"--address={cluster.dashboard_url}",
        f"--submission-id={submission_id}",
        f"--working-dir={ROOT}",
        "--",
        sys.executable,
        "-m",
        "recipes.grpo",
        f"--config={config}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray job submit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def wait_for_roles(dashboard: str, token: str, timeout_s: float) -> tuple[dict[str, dict], dict[str, str]]:
    """Every role's actor ALIVE (Ray's state API over HTTP, with the token): ({role: actor}, {node id: kind})."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = get_json(f"{dashboard}/api/v0/nodes?limit=100", token)["data"]["result"]["result"]
        kind_of = {}
        for n in nodes:
            kinds = [k.split(":", 1)[1] for k in n.get("resources_total", {}) if k.startswith("node_kind:")]
            kind_of[n["node_id"]] = kinds[0] if kinds else "?"
        actors = get_json(f"{dashboard}/api/v0/actors?limit=1000&detail=true", token)["data"]["result"]["result"]
        alive = {}
        for role, cls in ROLE_CLASSES.items():
            found = [a for a in actors if a.get("class_name") == cls and a.get("state") == "ALIVE"]
            if found:
                alive[role] = found[0]
        if len(alive) == len(ROLE_CLASSES):
            return alive, kind_of
        if time.monotonic() > deadline:
            raise TimeoutError(f"roles not all alive within {timeout_s:.0f} s: alive {sorted(alive)}")
        time.sleep(3)


def wait_for_step(prometheus: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        q = urllib.parse.quote(f'ray_raylhf_step{{run="{RUN_NAME}"}}')
        try:
            if get_json(f"{prometheus}/api/v1/query?query={q}")["data"]["result"]:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus saw no ray_raylhf_step of run {RUN_NAME} within {timeout_s:.0f} s")
        time.sleep(3)


def browse(checks: Checks, dashboard: str, token: str, job_id: str, alive: dict, kind_of: dict, shots: Path) -> None:
    with Browser(timeout_s=60) as browser:
        page = browser.new_page(width=1600, height=1000)
        page.goto(f"{dashboard}/#/actors")
        page.wait_for_text(lambda t: len(t) > 0, timeout_s=60)
        refused = page.evaluate("fetch('/api/v0/actors?limit=1').then(r => r.status)")
        checks.check(
            refused == 401, "browser without token", f"the page's own API call answered HTTP {refused} (401 expected)"
        )
        # the dashboard's login dialog does exactly this with the token typed in: its cookie then authenticates the UI
        status = page.evaluate(
            f"fetch('/api/authenticate', {{method: 'POST', headers: {{Authorization: 'Bearer ' + {json.dumps(token)}}}}})"
            ".then(r => r.status)"
        )
        checks.check(status == 200, "browser login", f"POST /api/authenticate with the token: HTTP {status}")
        page.reload()  # as the login dialog does: the app starts again, now with the cookie

        want = {role: (ROLE_CLASSES[role], a["node_id"]) for role, a in alive.items()}
        # one string per table row as the page shows it (innerText puts each cell on its own line)
        rows_js = "Array.from(document.querySelectorAll('tbody tr')).map(r => r.innerText.split(/\\s+/).join(' '))"

        def row_of(rows: list[str], cls: str, node: str) -> str | None:
            return next((r for r in rows if f" {cls} " in f" {r} " and node in r and " ALIVE " in f" {r} "), None)

        deadline = time.monotonic() + 90
        while True:
            rows = page.evaluate(rows_js) or []
            if all(row_of(rows, cls, node) for cls, node in want.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        shot = page.screenshot(shots / "ray-dashboard-actors.png")
        for role, (cls, node) in want.items():
            line = row_of(rows, cls, node)
            kind = kind_of.get(node, "?")
            checks.check(
                line is not None and kind == ROLE_KINDS[role],
                f"actors page: {role}",
                f"{cls} ALIVE on node {node[:12]}… of kind {kind} (wanted {ROLE_KINDS[role]}); "
                + (f"row: {line[:140]}" if line else f"no such row among {rows}"[:1500]),
            )
        nodes = {a["node_id"] for a in alive.values()}
        checks.check(len(nodes) == 4, "four nodes", f"the four roles run on {len(nodes)} different nodes; {shot}")

        page.goto(f"{dashboard}/#/jobs/{job_id}")
        try:
            text = page.wait_for_text(lambda t: job_id in t and "RUNNING" in t, timeout_s=90)
            ok = True
        except BrowserError as e:
            text, ok = str(e), False
        shot = page.screenshot(shots / "ray-dashboard-job.png")
        checks.check(ok, "job page", f"#/jobs/{job_id} shows the job RUNNING ({len(text)} chars of text); {shot}")


def query_prometheus(checks: Checks, prometheus: str) -> None:
    names = set()
    for query in QUERIES:
        q = urllib.parse.quote(query.replace("ray_raylhf_", "ray_raylhf_", 1))
        result = get_json(f"{prometheus}/api/v1/query?query={q}")["data"]["result"]
        checks.say(f"      prometheus> {query}")
        for series in result:
            m = series["metric"]
            labels = ",".join(
                f'{k}="{v}"' for k, v in sorted(m.items()) if k in ("run", "role", "phase", "stat", "instance")
            )
            checks.say(f"        {m['__name__']}{{{labels}}} {series['value'][1]}")
            names.add(m["__name__"])
    ok = {"ray_raylhf_step", "ray_raylhf_reward_mean", "ray_raylhf_phase_seconds"} <= names
    checks.check(
        ok, "prometheus", f"{len(names)} ray_raylhf_* metrics of the live run scraped from the nodes: {sorted(names)}"
    )


def check_grafana(checks: Checks, cluster: multinode.NodeCluster) -> None:
    grafana = Path(cluster.head.temp_dir) / "session_latest/metrics/grafana"
    providers = list((grafana / "provisioning/dashboards").glob("*.yml"))
    folders = []
    for f in providers:
        for provider in yaml.safe_load(f.read_text()).get("providers", []):
            folders.append(Path(provider.get("options", {}).get("path", "")))
    holding = [d for d in folders if (d / "raylhf_dashboard.json").exists()]
    checks.check(
        bool(holding),
        "grafana provisioning",
        f"{[str(p.relative_to(cluster.head.temp_dir)) for p in providers]} -> {[str(d) for d in folders]}; "
        f"raylhf_dashboard.json there: {bool(holding)}",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--screenshots", default=str(ROOT / "docs"), help="folder for the two screenshots (default docs/)")
    ap.add_argument("--out", help="also write the output to this file")
    ap.add_argument("--timeout-s", type=float, default=300, help="for the roles to start and a step to be logged")
    args = ap.parse_args(argv)
    checks = Checks(args.out)
    shots = Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raylhf-dashboard-check-"))
    from tests.tiny_models import build_tiny_causal_lm

    model = build_tiny_causal_lm(work / "tiny", TEXTS, seed=0)
    t0 = time.monotonic()
    cluster = multinode.start(WORKER_KINDS, HEAD_KIND, cpus_per_node=1, object_store_mb=256, watch=True)
    prometheus, job_id = None, None
    try:
        token = Path(cluster.token_path).read_text().strip()
        checks.say(
            f"cluster: {len(cluster.nodes)} nodes ({', '.join(n.kind for n in cluster.nodes)}), dashboard "
            f"{cluster.dashboard_url}, token auth; up in {time.monotonic() - t0:.0f} s"
        )
        prometheus, prom_url = start_prometheus(cluster, work)
        job_id = f"raylhf-dashboard-check-{int(time.time())}"
        submit(cluster, run_config(work, model), job_id)
        checks.say(f"submitted with `ray job submit` and the token: {job_id} (recipes.grpo, tiny models)")
        alive, kind_of = wait_for_roles(cluster.dashboard_url, token, args.timeout_s)
        wait_for_step(prom_url, args.timeout_s)
        checks.say(f"every role alive and a step logged after {time.monotonic() - t0:.0f} s")
        query_prometheus(checks, prom_url)
        browse(checks, cluster.dashboard_url, token, job_id, alive, kind_of, shots)
        check_grafana(checks, cluster)
    except Exception as e:
        checks.check(False, "run", f"{type(e).__name__}: {e}"[:3000])
    try:
        subprocess.run(
            [multinode.RAY, "job", "stop", f"--address={cluster.dashboard_url}", job_id],
            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | cluster.client_env(),
            capture_output=True,
            timeout=60,
        ) if job_id else None
        if job_id:  # what the job said, whatever happened (its log goes with the nodes)
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | cluster.client_env()
            proc = subprocess.run(
                [multinode.RAY, "job", "logs", f"--address={cluster.dashboard_url}", job_id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            (work / "job.log").write_text(proc.stdout)
            checks.say(
                f"      job log ({work / 'job.log'}), last lines: "
                + " | ".join(proc.stdout.strip().splitlines()[-4:])[:1500]
            )
    finally:
        if prometheus is not None:
            os.killpg(prometheus.pid, signal.SIGTERM)
            prometheus.wait(timeout=30)
        leftovers = multinode.stop(cluster)
        checks.check(not leftovers, "teardown", f"nodes stopped; leftover processes: {leftovers}")
    checks.say(f"{'FAILED' if checks.failed else 'ALL PASSED'} in {time.monotonic() - t0:.0f} s")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
