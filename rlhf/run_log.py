"""Per-run logs: a JSONL line per step, TensorBoard scalars, and a one-line progress report.

Pure Python + torch's TensorBoard writer; the Ray-dashboard metrics live in actors/ (they need Ray).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


def format_metrics(metrics: dict) -> str:
    """'eval/accuracy=0.17, eval/response_length=11.46' for log lines."""
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class RunLogger:
    def __init__(self, directory: str | Path, total_steps: int, jsonl: bool = True, tensorboard: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.jsonl = (self.dir / "metrics.jsonl").open("a") if jsonl else None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def restart_clock(self) -> None:
        """Time steps from now (e.g. after the held-out evaluation before training)."""
        self.started = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.perf_counter() - self.started, 3), **clean}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def progress(self, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> str:
        """'step 3/30 | reward 0.41 | kl 0.002 | 12.3 s/step | ETA 5m32s' for the given keys."""
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / max(step, 1)
        eta = per_step * max(self.total_steps - step, 0)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
        parts += [f"{per_step:.1f} s/step", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class PhaseTimer:
    """`with timer("generate"): ...` adds the block's wall seconds to `timer.seconds["generate"]`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
