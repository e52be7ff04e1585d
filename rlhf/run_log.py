"""Per-run logs: a JSONL line per step, TensorBoard scalars, and a one-line progress report.

Pure Python + torch's TensorBoard writer; the Ray-dashboard metrics and wandb live in
actors/metrics.py and reach RunLogger as extra sinks (objects with `.log(step, metrics)` and
`.close()`), so this module never imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def format_metrics(metrics: Mapping[str, float]) -> str:
    """'eval/accuracy=0.17, eval/response_length=11.46' for log lines."""
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class RunLogger:
    def __init__(
        self,
        directory: str | Path,
        total_steps: int,
        jsonl: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        sinks: list[MetricSink] | None = None,
    ):
        """A fresh run (resume_step None) starts empty logs. A run resumed from the checkpoint of
        step k keeps the logged steps <= k and drops later ones (logged after that checkpoint,
        before the crash), so every step appears once."""
        self.dir = Path(directory)
        self.sinks = list(sinks or [])  # more destinations per step: Ray metrics, wandb (actors/metrics.py)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.started, self.steps_done = time.perf_counter(), 0
        self.jsonl = None
        if jsonl:
            path = self.dir / "metrics.jsonl"
            kept = _lines_up_to(path, resume_step) if resume_step is not None and path.exists() else []
            self.jsonl = path.open("w")
            self.jsonl.writelines(kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of steps >= it written before the resume
            self.tb = SummaryWriter(
                str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None
            )

    def restart_clock(self, steps_done: int = 0) -> None:
        """Time steps from now (e.g. after the held-out evaluation before training); a resumed
        run passes the steps already done, so s/step and the ETA count only this run's steps."""
        self.started = time.perf_counter()
        self.steps_done = steps_done

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self.jsonl:
            self.jsonl.write(
                json.dumps({"step": step, "time": round(time.perf_counter() - self.started, 3), **clean}) + "\n"
            )
            self.jsonl.flush()
        if self.tb:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        for sink in list(self.sinks):
            try:
                sink.log(step, clean)
            except Exception as e:  # a broken exporter must not end a training run; JSONL still has it all
                log.warning(
                    "metrics sink %s failed (%s: %s); it is switched off for this run",
                    type(sink).__name__,
                    type(e).__name__,
                    e,
                )
                self.sinks.remove(sink)

    def progress(self, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> str:
        """'step 3/30 | reward 0.41 | kl 0.002 | 12.3 s/step | ETA 5m32s' for the given keys."""
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / max(step - self.steps_done, 1)
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
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("closing metrics sink %s failed: %s: %s", type(sink).__name__, type(e).__name__, e)


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The JSONL lines of steps <= step. The "after" evaluation shares the last step's number, so
    it is dropped with everything past the checkpoint only when the checkpoint precedes it."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by the crash
            continue
    return kept


class PhaseTimer:
    """`with timer("generate"): ...` adds the block's wall seconds to `timer.seconds["generate"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
