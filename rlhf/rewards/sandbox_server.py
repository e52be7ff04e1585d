"""The sandbox's own side: rlhf.rewards.sandbox.Sandbox starts a Python that runs `main()`.

Reads its configuration (one JSON line), isolates itself (namespaces, rlimits, `nobody`), builds
the reward, then answers each request line with one reply line. See rlhf/rewards/sandbox.py for
what this promises. Standard library only: it must start fast and import nothing it need not.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import math
import os
import reprlib
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

NOBODY = 65534  # the uid/gid the server takes when started as root
MESSAGE_CHARS = 200  # error messages are cut to this
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 1, 8, 38, 47, 2
CAP_DAC_READ_SEARCH = 2

# A reward function as built here: (completions, samples) -> whatever it returns (checked by _as_values).
Reward = Callable[[list[str], list[dict[str, Any]]], object]
# [sample index, message] pairs: lists, as they cross to the trainer in JSON.
SampleErrors = list[list[int | str]]


def _libc() -> ctypes.CDLL:
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


def _limit_and_drop(limits: dict[str, Any], home: str) -> list[str]:
    """Hard rlimits, no new privileges, and the `nobody` user if we are root."""
    root = os.geteuid() == 0
    mb = 1024 * 1024
    nproc = limits["max_processes"] if root else _tasks_of(os.getuid()) + limits["max_processes"]
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_CPU, limits["cpu_time_s"]),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_NOFILE, limits["max_open_files"]),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb),
        (resource.RLIMIT_CORE, 0),
    ):
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
        data = data[os.write(fd, data) :]


def _short(value: Any) -> str:
    try:
        return reprlib.repr(value)[:MESSAGE_CHARS]
    except Exception:
        return f"a {type(value).__name__}"


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MESSAGE_CHARS]


def _as_values(raw: Any, n: int) -> tuple[list[float | None], SampleErrors, str | None]:
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
    values: list[float | None] = []
    errors: SampleErrors = []
    for i, value in items:
        number: float | None = None
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


def _run(fn: Reward, completions: list[str], samples: list[dict[str, Any]]) -> object:
    try:
        return fn(completions, samples)
    finally:
        if os.getpid() != _SERVER_PID:  # a process the reward forked came back to us: it must not answer
            os._exit(0)


def _score(fn: Reward, completions: list[str], samples: list[dict[str, Any]], retry_alone: bool) -> dict[str, Any]:
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
                one, one_errors, one_error = _as_values(_run(fn, completions[i : i + 1], samples[i : i + 1]), 1)
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


def _build(config: dict[str, Any]) -> Reward:
    module, _, name = config["build"].partition(":")
    fn: Reward = getattr(importlib.import_module(module), name)(*config["args"])
    return fn


def _serve(config: dict[str, Any], isolation: list[str]) -> None:
    global _SERVER_PID
    _SERVER_PID = os.getpid()
    reply_fd = os.dup(1)  # replies go here; what the reward prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    fn: Reward | None = None
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


def _wait_for(pid: int, trainer: int | None = None) -> int:
    """Reap children until `pid` exits (as init, orphans are ours too); its exit status, shell style.
    With `trainer`: kill `pid` once the trainer is gone (its parent changed)."""
    while True:
        try:
            done, status = os.waitpid(-1, 0 if trainer is None else os.WNOHANG)
        except ChildProcessError:
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status) % 256
        if trainer is not None:
            if os.getppid() != trainer:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def main() -> None:
    # No PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and a trainer
    # may start the sandbox from a short-lived thread. This process polls for its parent instead.
    trainer = os.getppid()
    config = json.loads(sys.stdin.buffer.readline())
    isolation = _enter_namespaces(config["limits"]["network"])
    child = os.fork()  # in a new PID namespace, the child is its pid 1 (init)
    if child:
        status = _wait_for(child, trainer)
        shutil.rmtree(config["home"], ignore_errors=True)  # the trainer may be gone and not do it
        os._exit(status)
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
