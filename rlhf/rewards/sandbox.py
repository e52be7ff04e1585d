"""The reward sandbox: reward code runs in a separate, limited process and answers in JSON.

    trainer (Sandbox)  --JSON lines on stdin/stdout-->  python: rlhf.rewards.sandbox_server.main()
                                                          outer  (a new session: killed as a group)
                                                            init   pid 1 of a new PID namespace, where allowed
                                                              server  limits, then drops to `nobody` if root;
                                                                      builds the reward, scores each request

What holds (Linux; `Sandbox.isolation` says which applied):
- Each request has one wall-clock deadline. Past it, the trainer kills the sandbox: init first (the
  kernel then kills everything in its PID namespace, processes that called setsid() included),
  then the outer process group; the next call starts a fresh sandbox.
- After each answered request the server kills every other process left in the sandbox (children
  of the reward that outlive it) and reaps them.
- Limits (setrlimit, hard, in the server): address space, CPU seconds, processes, open files,
  file size, no core files; no-new-privileges. Started as root, the server runs as `nobody`, so
  RLIMIT_NPROC binds (it does not bind for root), it cannot signal or trace the trainer, and the
  trainer's private files (Ray tokens, keys) are out of reach; the user's reward file is read by
  the trainer and sent as text. Exception: when `nobody` cannot read the Python install itself
  (e.g. pyenv under /root), it keeps CAP_DAC_READ_SEARCH: it can then read, not write, any file.
  Not root: a user namespace (where the OS allows one) holds the PID and network namespaces, and
  RLIMIT_NPROC counts all of the user's processes, so it is set to their count now + the limit.
- No network (an empty network namespace: no interface but a down loopback) unless asked for.
- Results cross as JSON and are validated by the trainer; nothing is unpickled; a reply is read
  with a byte cap; user output to stdout goes to stderr, which the trainer reads with a cap.
- The trainer dying (even SIGKILL) takes the sandbox with it: the outer process polls for its
  parent and kills init; init and server die with their parents (Not provided: filesystem isolation (world-readable files can be read, /tmp written) and a limit
on total disk; RLIMIT_NPROC counts every process of `nobody` on the machine, other sandboxes
included; a reward can forge its own reply (values it controls anyway), not another call's. Without
user and PID namespaces (non-root, where the OS forbids them) a process that calls setsid()
escapes the kill-on-timeout, bounded then only by the CPU limit.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from rlhf.rewards.sandbox_server import MESSAGE_CHARS, NOBODY

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 60.0  # interpreter start-up and imports, on a busy machine
ENV_KEPT = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "HF_HOME")
STDERR_KEPT = 4096  # bytes of the sandbox's stderr kept for error messages


@dataclass(frozen=True)
class SandboxLimits:
    memory_mb: int = 4096  # address space of each process (RLIMIT_AS)
    cpu_time_s: int = 600  # CPU seconds of the server (RLIMIT_CPU); replaced once it has used half
    max_processes: int = 32  # processes and threads of the sandbox user (RLIMIT_NPROC)
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_file_mb: int = 64  # largest file it may write (RLIMIT_FSIZE)
    network: bool = False  # False: an empty network namespace where the OS allows one


class SandboxError(RuntimeError):
    """The sandbox failed as a whole (died, sent garbage, or too much): every sample of the call is lost."""


def max_reply_bytes(n: int) -> int:
    return 65536 + n * (MESSAGE_CHARS + 64)  # n numbers and n messages of at most MESSAGE_CHARS


# ------------------------------------------------------------------------------ trainer side
class Sandbox:
    """One sandbox process serving one reward; started lazily, replaced after a timeout or death."""

    def __init__(self, build: str, args: tuple[object, ...], limits: SandboxLimits, trusted: bool, retry_alone: bool):
        # trusted: `build` is our code, built before the privilege drop (imports as the trainer's
        # user); untrusted (a user's file): built after it, from the source text in `args`.
        self.config: dict[str, object] = {
            "build": build,
            "args": list(args),
            "limits": asdict(limits),
            "trusted": trusted,
            "retry_alone": retry_alone,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.home: str | None = None
        self.isolation: list[str] = []
        self.stderr_tail = b""
        self.lock = threading.Lock()  # one request at a time: a request and its reply share the pipes

    def call(self, completions: list[str], samples: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
        """The server's validated-shape reply {"values", "errors", "batch_error"}. TimeoutError past
        `timeout_s`, SandboxError if the sandbox died or misbehaved (it is then replaced)."""
        nonce = secrets.token_hex(8)  # the reply must echo it: a stale or forged line is caught
        request = (
            json.dumps({"id": nonce, "completions": completions, "samples": samples}, default=str).encode() + b"\n"
        )
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start_locked()
            deadline = time.monotonic() + timeout_s
            try:
                self._write(request, deadline)
                reply = self._read_reply(deadline, max_reply_bytes(len(completions)))
                if reply.get("id") != nonce:
                    raise SandboxError("the reward sandbox answered with a line that is not the reply to this request")
            except BaseException:
                self._kill_locked()
                raise
            if reply.get("recycle"):  # near its CPU limit: the next call gets a fresh one
                self._kill_locked()
            return reply

    def start(self) -> None:
        """Start now (e.g. to surface a reward's import errors at start-up); ValueError if building it failed."""
        with self.lock:
            self._start_locked()

    def kill(self) -> None:
        with self.lock:
            self._kill_locked()

    def _start_locked(self) -> None:
        self._kill_locked()
        self.home = tempfile.mkdtemp(prefix="rlhf-reward-")  # its cwd and HOME, writable by it
        if os.geteuid() == 0:
            os.chown(self.home, NOBODY, NOBODY)
        env = {k: v for k, v in os.environ.items() if k in ENV_KEPT} | {"HOME": self.home, "PYTHONUNBUFFERED": "1"}
        # the folder holding this copy of `rlhf` first: the sandbox imports the same code, wherever it came from
        env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from rlhf.rewards.sandbox_server import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.home,
            env=env,
            start_new_session=True,  # its own process group
        )
        self.stderr_tail = b""
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            self._write(json.dumps(self.config | {"home": self.home}).encode() + b"\n", deadline)
            ready = self._read_reply(deadline, 65536)
        except TimeoutError:
            self._kill_locked()
            raise TimeoutError(f"the reward sandbox did not start within {START_TIMEOUT_S:g}s") from None
        except BaseException:
            self._kill_locked()
            raise
        if not ready.get("ready"):
            self._kill_locked()
            raise ValueError(str(ready.get("error"))[:2000])
        self.isolation = [str(x) for x in ready.get("isolation", [])]

    def _kill_locked(self) -> None:
        if self.proc is not None:
            for child in _children(self.proc.pid):  # init of its PID namespace (whose death takes every
                try:  # process in it along), else the server
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=5)  # the outer process reaps it, then exits
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the outer process group, whatever is left of it
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
            self.proc = None
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def _write(self, data: bytes, deadline: float) -> None:
        fd, _, _ = self._fds()
        view = memoryview(data)
        while view:
            if not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
                raise TimeoutError("the reward sandbox did not read its request in time")
            try:
                view = view[os.write(fd, view[:65536]) :]
            except BrokenPipeError:
                raise SandboxError(self._died("before reading its request")) from None

    def _fds(self) -> tuple[int, int, int]:
        """stdin, stdout and stderr of the running sandbox (all pipes: see _start_locked)."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise SandboxError("the reward sandbox is not running")
        return proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()

    def _read_reply(self, deadline: float, cap: int) -> dict[str, Any]:
        """One JSON line from stdout within `deadline` and `cap` bytes; stderr drained meanwhile."""
        _, out, err = self._fds()
        watched, line = [out, err], b""
        while b"\n" not in line:
            left = deadline - time.monotonic()
            readable = select.select(watched, [], [], max(0.0, left))[0] if left > 0 else []
            if not readable:
                raise TimeoutError("no reply in time")
            if err in readable:
                chunk = os.read(err, 65536)
                self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_KEPT:]
                if not chunk:  # closed: stop watching it (select would return at once, forever)
                    watched.remove(err)
            if out in readable:
                chunk = os.read(out, 65536)
                if not chunk:
                    raise SandboxError(self._died("while answering"))
                line += chunk
                if len(line) > cap:
                    raise SandboxError(f"the reward sandbox's reply exceeded {cap} bytes")
        try:
            reply = json.loads(line.split(b"\n", 1)[0])
        except ValueError:
            raise SandboxError(f"the reward sandbox sent a line that is not JSON: {line[:100]!r}") from None
        if not isinstance(reply, dict):
            raise SandboxError(f"the reward sandbox sent {type(reply).__name__}, not an object")
        return reply

    def _died(self, when: str) -> str:
        code: int | None = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        tail = self.stderr_tail.decode(errors="replace").strip().splitlines()[-3:]
        cause = "; its stderr ends: " + " | ".join(tail) if tail else ""
        return f"the reward sandbox died {when} (exit status {code}: out of memory or a limit?){cause}"[:1000]


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s children, found here in /proc (the sandbox is not trusted to say)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found
