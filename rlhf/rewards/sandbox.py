"""The reward sandbox: reward code runs in a separate, limited process and answers in JSON.

    trainer (Sandbox)  --JSON lines on stdin/stdout-->  python -m rlhf.rewards.sandbox
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
  RLIMIT_NPROC binds (it does not bind for root) and the trainer's files, sockets and Ray tokens
  of mode 0600/0700 are out of reach; the user's reward file is read by the trainer and sent as text.
- No network (an empty network namespace: no interface but a down loopback) unless asked for.
- Results cross as JSON and are validated by the trainer; nothing is unpickled; a reply is read
  with a byte cap; user output to stdout goes to stderr, which the trainer reads with a cap.
Not provided: filesystem isolation (world-readable files can be read, /tmp written), limits on
total disk or on processes of `nobody` outside this sandbox; without user and PID namespaces
(non-root, where the OS forbids them) a process that calls setsid() escapes the kill-on-timeout,
bounded then only by the CPU limit.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import math
import os
import reprlib
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

NOBODY = 65534  # the uid/gid the server takes when started as root
START_TIMEOUT_S = 60.0  # interpreter start-up and imports, on a busy machine
ENV_KEPT = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "HF_HOME")
STDERR_KEPT = 4096  # bytes of the sandbox's stderr kept for error messages
MESSAGE_CHARS = 200  # error messages are cut to this
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 1, 8, 38, 47, 2
CAP_DAC_READ_SEARCH = 2


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

    def __init__(self, build: str, args: tuple, limits: SandboxLimits, trusted: bool, retry_alone: bool):
        # trusted: `build` is our code, built before the privilege drop (imports as the trainer's
        # user); untrusted (a user's file): built after it, from the source text in `args`.
        self.config = {"build": build, "args": list(args), "limits": asdict(limits), "trusted": trusted,
                       "retry_alone": retry_alone}
        self.proc: subprocess.Popen | None = None
        self.home: str | None = None
        self.isolation: list[str] = []
        self.stderr_tail = b""
        self.lock = threading.Lock()  # one request at a time: a request and its reply share the pipes

    def call(self, completions: list[str], samples: list[dict], timeout_s: float) -> dict:
        """The server's validated-shape reply {"values", "errors", "batch_error"}. TimeoutError past
        `timeout_s`, SandboxError if the sandbox died or misbehaved (it is then replaced)."""
        nonce = secrets.token_hex(8)  # the reply must echo it: a stale or forged line is caught
        request = json.dumps({"id": nonce, "completions": completions, "samples": samples}, default=str).encode() + b"\n"
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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.rewards.sandbox"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=self.home, env=env, start_new_session=True,  # its own process group
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
                try:                                # process in it along), else the server
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
                pipe.close()
            self.proc = None
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def _write(self, data: bytes, deadline: float) -> None:
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            if not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
                raise TimeoutError("the reward sandbox did not read its request in time")
            try:
                view = view[os.write(fd, view[:65536]):]
            except BrokenPipeError:
                raise SandboxError(self._died("before reading its request")) from None

    def _read_reply(self, deadline: float, cap: int) -> dict:
        """One JSON line from stdout within `deadline` and `cap` bytes; stderr drained meanwhile."""
        out, err = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        line = b""
        while b"\n" not in line:
            left = deadline - time.monotonic()
            readable = select.select([out, err], [], [], max(0.0, left))[0] if left > 0 else []
            if not readable:
                raise TimeoutError("no reply in time")
            if err in readable:
                chunk = os.read(err, 65536)
                self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_KEPT:]
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
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        tail = self.stderr_tail.decode(errors="replace").strip().splitlines()[-3:]
        cause = "; its stderr ends: " + " | ".join(tail) if tail else ""
        return f"the reward sandbox died {when} (exit status {code}: out of memory or a limit?){cause}"[:1000]


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s children, found here in /proc (the sandbox is not trusted to say)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


# ------------------------------------------------------------------------------ sandbox side
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies, so a killed trainer leaves no sandbox behind."""
    parent = os.getppid()
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _enter_namespaces(network: bool) -> list[str]:
    """unshare a PID namespace (and a network one unless `network`); a user namespace if not root."""
    flags = CLONE_NEWPID | (0 if network else CLONE_NEWNET)
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        flags |= CLONE_NEWUSER  # unprivileged namespaces, where the OS allows them
    if _libc().unshare(flags) != 0:
        return []
    if uid != 0:  # map ourselves to ourselves, so files keep their owners
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return ["pid namespace"] + ([] if network else ["no network"])


def _tasks_of(uid: int) -> int:
    """Processes and threads of `uid` now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):
            continue
    return count


def _limit_and_drop(limits: dict, home: str) -> list[str]:
    """Hard rlimits, no new privileges, and the `nobody` user if we are root."""
    root = os.geteuid() == 0
    mb = 1024 * 1024
    nproc = limits["max_processes"] if root else _tasks_of(os.getuid()) + limits["max_processes"]
    for which, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_CPU, limits["cpu_time_s"]),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, limits["max_open_files"]),
                         (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    held = ["rlimits"]
    if root:
        readable = _python_is_world_readable()
        if not readable:  # e.g. pyenv under /root: `nobody` could not even import the standard library
            _libc().prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        if readable:
            held.append("user nobody")
        else:
            _keep_only_read_any_file()
            held.append("user nobody, reads any file (the Python install is not world-readable)")
    os.chdir(home)
    return held


def _python_is_world_readable() -> bool:
    """Can `nobody` reach the interpreter, its standard library and every import path?"""
    paths = [os.path.realpath(sys.executable), os.path.dirname(os.__file__)] + [p for p in sys.path if os.path.isdir(p)]
    for path in paths:
        path = os.path.realpath(path)
        while True:
            mode = os.stat(path).st_mode
            need = 0o005 if os.path.isdir(path) else 0o004  # others: read (+ search for folders)
            if mode & need != need:
                return False
            if path == "/":
                break
            path = os.path.dirname(path)
    return True


def _keep_only_read_any_file() -> None:
    """After setuid (with KEEPCAPS): CAP_DAC_READ_SEARCH alone, also for programs the reward runs."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0)
    libc = _libc()
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0)


def _write_line(fd: int, obj: Any) -> None:
    data = json.dumps(obj, allow_nan=False).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def _short(value: Any) -> str:
    try:
        return reprlib.repr(value)[:MESSAGE_CHARS]
    except Exception:
        return f"a {type(value).__name__}"


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MESSAGE_CHARS]


def _as_values(raw: Any, n: int) -> tuple[list, list, str | None]:
    """(values, [[i, message]...], batch error) from what a reward returned, for n completions."""
    if isinstance(raw, (Mapping, str, bytes, set, frozenset)) or raw is None:
        return [None] * n, [], f"returned a {type(raw).__name__}; expected a list of {n} numbers"
    if hasattr(raw, "tolist"):  # numpy arrays, torch tensors
        raw = raw.tolist()
    if isinstance(raw, (list, tuple)) and len(raw) != n:
        return [None] * n, [], f"returned {len(raw)} values for {n} completions"
    try:
        items = list(zip(range(n + 1), raw))  # bounded: an endless generator stops at n + 1
    except TypeError:
        return [None] * n, [], f"returned a {type(raw).__name__}; expected a list of {n} numbers"
    if len(items) != n:
        return [None] * n, [], f"returned {'more' if len(items) > n else len(items)} values for {n} completions"
    values, errors = [], []
    for i, value in items:
        number = None
        if not isinstance(value, (str, bytes)):  # float("1") would pass; a reward must be a number
            try:
                number = float(value)
            except Exception:
                pass
        if number is None or not math.isfinite(number):
            errors.append([i, f"sample {i}: {_short(value)} is not a finite number"])
            number = None
        values.append(number)
    return values, errors, None


_SERVER_PID = 0  # set in _serve


def _run(fn, completions: list, samples: list) -> Any:
    try:
        return fn(completions, samples)
    finally:
        if os.getpid() != _SERVER_PID:  # a process the reward forked came back to us: it must not answer
            os._exit(0)


def _score(fn, completions: list, samples: list, retry_alone: bool) -> dict:
    n = len(completions)
    try:
        values, errors, batch_error = _as_values(_run(fn, completions, samples), n)
        return {"values": values, "errors": errors, "batch_error": batch_error}
    except BaseException as e:  # SystemExit and MemoryError included: a reward's failure, not ours
        batch_error = _message(e)
    values, errors = [None] * n, []
    if retry_alone and n > 1:  # each sample alone: only the ones that still fail lose their reward
        for i in range(n):
            try:
                one, one_errors, one_error = _as_values(_run(fn, completions[i:i + 1], samples[i:i + 1]), 1)
                values[i] = one[0]
                if one_error or one_errors:
                    errors.append([i, f"sample {i}: {one_error or one_errors[0][1]}"])
            except BaseException as e:
                errors.append([i, f"sample {i}: {_message(e)}"])
    failed = sum(v is None for v in values)
    note = f" (retried alone: {failed} of {n} failed)" if retry_alone and n > 1 else ""
    return {"values": values, "errors": errors, "batch_error": batch_error + note}


def _kill_leftovers(in_pid_namespace: bool) -> None:
    """Kill every other process of the sandbox (children the reward left running) and reap them."""
    if in_pid_namespace:
        try:
            os.kill(-1, signal.SIGKILL)  # every process we may signal in our namespace but init and us
        except ProcessLookupError:
            pass
    else:
        me, group = os.getpid(), os.getpgrp()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me:
                try:
                    if os.getpgid(int(entry)) == group:
                        os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
    while True:  # SIGKILL cannot be ignored: each child exits soon (grandchildren are init's to reap)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


def _build(config: dict):
    module, _, name = config["build"].partition(":")
    return getattr(importlib.import_module(module), name)(*config["args"])


def _serve(config: dict, isolation: list[str]) -> None:
    global _SERVER_PID
    _SERVER_PID = os.getpid()
    reply_fd = os.dup(1)  # replies go here; what the reward prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    fn = None
    try:
        if config["trusted"]:
            fn = _build(config)
        isolation = isolation + _limit_and_drop(config["limits"], config["home"])
        if fn is None:
            fn = _build(config)
    except BaseException as e:
        if os.getpid() != _SERVER_PID:  # forked while importing the user's file
            os._exit(0)
        _write_line(reply_fd, {"ready": False, "error": str(e) if isinstance(e, ValueError) else _message(e)})
        return
    if os.getpid() != _SERVER_PID:
        os._exit(0)
    _write_line(reply_fd, {"ready": True, "isolation": isolation})
    cpu_limit = config["limits"]["cpu_time_s"]
    for line in sys.stdin.buffer:
        request = json.loads(line)
        reply = _score(fn, request["completions"], request["samples"], config["retry_alone"])
        _kill_leftovers("pid namespace" in isolation)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        reply["recycle"] = usage.ru_utime + usage.ru_stime > cpu_limit / 2
        reply["id"] = request["id"]
        _write_line(reply_fd, reply)


def _wait_for(pid: int) -> int:
    """Reap children until `pid` exits (as init, orphans are ours too); its exit status, shell style."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status) % 256


def main() -> None:
    _die_with_parent()
    config = json.loads(sys.stdin.buffer.readline())
    isolation = _enter_namespaces(config["limits"]["network"])
    child = os.fork()  # in a new PID namespace, the child is its pid 1 (init)
    if child:
        os._exit(_wait_for(child))
    _die_with_parent()
    if "pid namespace" in isolation:  # init stays a reaper; the server is its child
        server = os.fork()
        if server:
            os._exit(_wait_for(server))
        _die_with_parent()
    _serve(config, isolation)
    os._exit(0)


if __name__ == "__main__":
    main()
