"""The Ray dashboard and the run's metrics checked as a user sees them (scripts/dashboard_check.py):
a live GRPO job on four local nodes, its job and actors pages in headless Chromium with the token,
every role ALIVE on the node of its kind, the run's ray_raylhf_* series through Prometheus, and the
Grafana provisioning. Slow (2-3 minutes, four nodes) and needs Debian's chromium and prometheus
(scripts/install_browser_tools.sh): not in CI; `make test-slow` runs it. Its recorded output is in
the README ("Several nodes")."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("prometheus")),
        reason="needs chromium and prometheus: scripts/install_browser_tools.sh",
    ),
]

ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_shows_every_role_on_its_node_and_prometheus_the_run(tmp_path):
    out = tmp_path / "dashboard-check.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/dashboard_check.py", "--screenshots", str(tmp_path), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, text + proc.stderr[-3000:]
    passed = {line[6:30].strip() for line in text.splitlines() if line.startswith("PASS ")}
    for name in ("browser without token", "browser login", "job page", "four nodes", "prometheus", "teardown"):
        assert name in passed, text
    for role in ("policy", "reference", "reward", "rollout"):
        assert f"actors page: {role}" in passed, text
    assert "grafana provisioning" in passed, text
    for shot in ("ray-dashboard-job.png", "ray-dashboard-actors.png"):
        data = (tmp_path / shot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
