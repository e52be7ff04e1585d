"""Pure helpers of the benchmark suite (no Ray, no torch): step-time breakdown, process roles,
and the machine description. Unit-tested in tests/unit/test_bench_stats.py."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

# The phases RLCoordinator.step times (metrics `time/<phase>`); the rest of a step's wall time
# (advantages, collation, logging, Ray call overhead) is "other": orchestration overhead.
PHASES = ("generate", "score", "reference", "train", "sync")

# Ray names an actor's worker process "ray::<Class>" ("ray::<Class>.<method>()" while it runs one).
ROLE_OF_CLASS = {
    "PolicyActor": "policy",
    "ReferenceActor": "reference",
    "CriticActor": "critic",
    "RewardActor": "reward",
    "RolloutWorker": "rollout",
}


def step_walls(times: list[float]) -> list[float]:
    """Each step's wall seconds from the run clock at each step's log line (metrics.jsonl `time`:
    seconds since training started, logged as each step ends)."""
    return [b - a for a, b in zip([0.0] + times[:-1], times)]


def step_breakdown(walls: list[float], metrics: list[dict], skip: int = 1) -> dict[str, float]:
    """Medians over the steps after the first `skip` (warm-up) of: the step's wall time, each
    timed phase, "other" = wall - sum of the phases, and other's share of the step (the median
    of the per-step shares)."""
    rows = list(zip(walls, metrics))[skip:]
    if not rows:
        raise ValueError(f"need more than {skip} step(s) to leave out the warm-up, got {len(walls)}")
    phase = lambda m, p: float(m.get(f"time/{p}", 0.0))
    other = [w - sum(phase(m, p) for p in PHASES) for w, m in rows]
    out = {"step": statistics.median(w for w, _ in rows)}
    out |= {p: statistics.median(phase(m, p) for _, m in rows) for p in PHASES}
    out["other"] = statistics.median(other)
    out["other_share"] = statistics.median(o / w for o, (w, _) in zip(other, rows))
    out["steps_measured"] = float(len(rows))
    return out


def role_of(process_title: str) -> str | None:
    """'ray::PolicyActor.train_step()' -> 'policy'; None for anything that is not a role's actor."""
    found = re.match(r"ray::(\w+)", process_title)
    return ROLE_OF_CLASS.get(found.group(1)) if found else None


def peak_kib(status_text: str) -> int | None:
    """VmHWM (the process's peak resident set, KiB) from the text of /proc/<pid>/status."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", status_text, re.M)
    return int(found.group(1)) if found else None


def machine_description() -> str:
    """'2 x AMD EPYC 7B13 cores, 24 GiB RAM, no GPU' (from /proc: Linux; best effort elsewhere)."""
    model, mem = "unknown CPU", ""
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
        kib = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    gpu = "NVIDIA GPU" if Path("/proc/driver/nvidia/gpus").exists() else "no GPU"
    return f"{os.cpu_count()} x {model} cores{mem}, {gpu}"
