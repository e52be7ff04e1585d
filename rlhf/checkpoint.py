"""Checkpoint folders that a crash can never leave half-written, and the driver's RNG state.

A checkpoint of step k is the folder `<root>/step_<k>` (zero-padded). It is written as
`<root>/step_<k>.partial` and renamed into place only once every role has written its part: a
rename within one filesystem is atomic, so `latest()` sees either the whole checkpoint or none
of it, and a crash while saving leaves the last good one untouched. Each role writes its own
subfolder (DeepSpeed's engine state: weights, optimizer, LR scheduler); the driver writes
`driver.pt` (step, data position, KL controller, RNG states, held-out metrics) last.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

_COMMITTED = re.compile(r"^step_(\d+)$")
DRIVER_STATE = "driver.pt"


class CheckpointDir:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root).resolve()  # absolute: actors on other processes write into it
        self.keep_last = keep_last

    def committed(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _COMMITTED.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.committed()
        return found[-1] if found else None

    def staging(self, step: int) -> Path:
        """An empty folder to write step `step` into; `commit(step)` publishes it."""
        path = self.root / f"step_{step:08d}.partial"
        shutil.rmtree(path, ignore_errors=True)  # left over from a crash mid-save
        path.mkdir(parents=True)
        return path

    def commit(self, step: int) -> Path:
        """Atomically publish the staged folder, then drop all but the newest `keep_last`."""
        staged, final = self.root / f"step_{step:08d}.partial", self.root / f"step_{step:08d}"
        if not (staged / DRIVER_STATE).is_file():
            raise RuntimeError(f"{staged} has no {DRIVER_STATE}: the checkpoint was not fully written")
        if final.exists():  # the same step saved again (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(self.root)
        for _, old in self.committed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clear(self) -> None:
        """Remove every checkpoint (a fresh run reusing a run name)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Python's and torch's global RNG states (numpy's too, when it is installed)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
