"""grafana/raylhf_dashboard.json queries only gauges actors/metrics.py exports, by the labels they
carry, and covers what a run is watched for (reward, KL, entropy, phase times, mismatch, errors)."""

import json
import re
from pathlib import Path

from actors.metrics import GAUGES
from actors.multinode import DASHBOARD_JSON, GRAFANA_DIR_ENV

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "raylhf_dashboard.json"
EXPORTED = {f"ray_{name}": {"run", "role", *tags} for name, (_, tags) in GAUGES.items()}  # Ray adds ray_


def queries(dash: dict) -> list[tuple[str, str]]:
    """(expression, legend) of every panel target and templating query."""
    out = [(t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((var["definition"], ""))
    return out


def test_every_queried_metric_and_label_is_exported():
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for expr, legend in queries(dash):
        names = re.findall(r"\bray_raylhf_\w+", expr)
        assert names, f"a query without a raylhf gauge: {expr}"
        for name in names:
            assert name in EXPORTED, f"{name} is not a gauge of actors/metrics.py (GAUGES)"
            used.add(name)
            labels = set(re.findall(r"(\w+)\s*[=!]~?\s*\"", expr)) | set(re.findall(r"\{\{(\w+)\}\}", legend))
            labels |= set(re.findall(r"label_values\(\w+,\s*(\w+)\)", expr))
            assert labels <= EXPORTED[name], f"{expr} / {legend!r}: labels {labels - EXPORTED[name]} not on {name}"
    must_show = {"reward_mean", "reward_errors", "kl", "entropy", "phase_seconds", "logprob_mismatch"}
    assert {f"ray_raylhf_{m}" for m in must_show} <= used
    assert used == set(EXPORTED), f"gauges with no panel: {set(EXPORTED) - used}"


def test_dashboard_is_one_grafana_dashboard_with_unique_panel_ids():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))


def test_the_local_cluster_provisions_this_file():
    # actors/multinode.py copies it into the folder Ray's dashboard provisioning reads
    assert DASHBOARD_JSON == DASHBOARD and GRAFANA_DIR_ENV == "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
