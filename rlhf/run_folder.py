"""A run's own folder: a new run never writes into another run's, and two processes never share one.

`<logging.dir>/<run_name>/` holds exactly one run: `run.json` (its id, name, status, where its
checkpoints are), config.yaml, metrics, checkpoints/, final/ and result.json. A new run whose
folder already holds anything takes the first free `<run_name>-2`, `-3`, ... and says so, so a
finished run is never overwritten; `checkpoint.resume=true` reopens the named folder on purpose.
While a run lives it holds an exclusive lock on `<folder>/.lock`: a second process given the
same folder (two resumes of one run, say) stops with a clear error instead of writing beside it.
The run id (a uuid, kept across resumes) is what makes "the files this run wrote" well defined:
every checkpoint's manifest carries it (rlhf/checkpoint.py).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("raylhf")

RUN_FILE, LOCK_FILE = "run.json", ".lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used; the message says which and what to do."""


@dataclass
class RunFolder:
    path: Path
    info: dict[str, Any]  # run.json's content
    resumed: bool = False  # an existing run reopened (checkpoint.resume=true), not a new one
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        run_id: str = self.info["run_id"]  # _read_info checked that it is a string
        return run_id

    @property
    def name(self) -> str:
        return self.path.name

    def update(self, **fields: Any) -> None:
        """Record fields in run.json (status, checkpoints, ...), atomically."""
        self.info.update(fields)
        _write_atomically(self.path / RUN_FILE, json.dumps(self.info, indent=2))

    def begin(self) -> None:
        """Mark the run under way (call once the checks before training have passed)."""
        self.update(
            status="running",
            pid=os.getpid(),
            host=socket.gethostname(),
            **({"resumed": _now()} if self.resumed else {}),
        )

    def abandon(self) -> None:
        """A new run that stopped before it began: remove its empty folder again."""
        if not self.resumed:
            for name in (RUN_FILE, LOCK_FILE):
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:  # something else was written there: keep it
                pass

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None


def open_run_folder(parent: str | Path, name: str, resume: bool) -> RunFolder:
    """The locked folder this run writes into: `parent/name` reopened when `resume` (a new run
    there if it holds nothing yet), else a new run in the first free `name`, `name-2`, ..."""
    parent = Path(parent).resolve()
    if resume:
        path = parent / name
        if path.is_dir() and any(path.iterdir()):
            folder = RunFolder(path, {}, resumed=True)
            folder._lock_fd = _lock(path)
            try:
                folder.info = _read_info(path)
            except BaseException:
                folder.close()
                raise
            log.info("run folder: %s (run %s, reopened to resume it)", path, folder.run_id)
            return folder
        log.info("checkpoint.resume=true: %s holds no run yet; starting a new run there", path)
    for n in itertools.count(1):
        path = parent / (name if n == 1 else f"{name}-{n}")
        info = _claim(path, name=path.name)
        if info is not None:
            break
    if n > 1:
        named = parent / name
        log.warning(
            "%s already holds %s; this new run writes to %s instead (checkpoint.resume=true continues that run)",
            named,
            _describe(named),
            path,
        )
    assert info is not None  # the loop above only ends with a folder claimed
    folder = RunFolder(path, info)
    folder._lock_fd = _lock(path)
    log.info("run folder: %s (run %s)", path, folder.run_id)
    return folder


def _claim(path: Path, name: str) -> dict[str, Any] | None:
    """Create run.json in `path` if the folder is new or empty; None when it is taken. Creating
    the file exclusively makes the claim safe against another run claiming the same folder now."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a plain file of that name
        return None
    if any(path.iterdir()):
        return None
    info = {
        "run_id": uuid.uuid4().hex,
        "run_name": name,
        "status": "starting",
        "started": _now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    try:
        fd = os.open(path / RUN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info, indent=2))
        f.flush()
        os.fsync(f.fileno())
    return info


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _describe(path)
        raise RunFolderError(
            f"{path} is in use by another live run ({holder}); two runs never share a folder: "
            "wait for it to end, or start a new run (without checkpoint.resume)"
        ) from None
    return fd


def _read_info(path: Path) -> dict[str, Any]:
    file = path / RUN_FILE
    if not file.is_file():
        raise RunFolderError(
            f"checkpoint.resume=true: {path} is not empty but has no {RUN_FILE}, so it is not a run "
            "this version wrote and its checkpoints cannot be verified; start a new run instead"
        )
    try:
        info = json.loads(file.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
            raise ValueError("no run_id")
    except ValueError as e:
        raise RunFolderError(
            f"{file} is unreadable ({e}); the run's identity is lost: start a new run, or a new "
            "run from one of its checkpoints with checkpoint.resume_from=<step folder>"
        ) from None
    return info


def _describe(path: Path) -> str:
    try:
        info = json.loads((path / RUN_FILE).read_text())
        return (
            f"run {info.get('run_id', '?')}, status {info.get('status', '?')}, pid {info.get('pid', '?')} "
            f"on {info.get('host', '?')}"
        )
    except (OSError, ValueError):
        return "files of another run"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
