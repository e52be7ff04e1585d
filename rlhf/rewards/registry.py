"""Turn the config's `rewards:` list into reward functions, and run them so a bad one cannot stop a run.

A reward function is a plain callable `(completions, samples) -> list[float]` (TRL style; see
rlhf.rewards.verifiers). `build_reward_functions` maps each RewardSpec kind to one:

    reasoning_gym  the task's own scorer (task from data.source, else each sample's metadata)
    math           math_answer_reward (math-verify against sample["answer"])
    format         format_reward (the completion is just a number)
    python         `function: path/to/file.py:name`, a function in a user's file
    http           POST {"completions": [...], "samples": [...]} to `url`, read {"rewards": [...]}
    model          scored by the reward-model Ray actor elsewhere: `remote=True`, no function here

`run_reward_function` never raises: an exception, a result of the wrong length, or values that
are not finite numbers give the spec's `fallback` for the samples affected, and are counted.

Isolation: functions run in one long-lived worker process (spawned lazily, reused across calls,
~1 s to start), so a call that hangs past `timeout_s` can be abandoned: the worker is killed and
the next call starts a fresh one. This also keeps users' code out of the trainer's process and
gives math-verify the main thread its SIGALRM timeouts need. Functions cross to the worker by
pickle, so reward functions are `RewardFactory` objects: a module-level builder plus its
arguments, built once per process on first call. HTTP rewards run in the caller's process: they
run no user code, and urllib's timeouts with retries already bound them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

from rlhf.rewards import verifiers

if TYPE_CHECKING:
    from rlhf.config import RewardSpec

RewardFn = Callable[[list[str], list[dict]], list[float]]
HTTP_RETRIES = 3
HTTP_FIRST_BACKOFF_S = 0.5


# ------------------------------------------------------------------------------ reward functions
_BUILT: dict["RewardFactory", RewardFn] = {}  # per process: a user module is imported once


@dataclass(frozen=True)
class RewardFactory:
    """A picklable reward function: `build(*args)` makes the real one on first call in a process."""

    build: Callable[..., RewardFn]  # module-level, so pickle sends it by name
    args: tuple = ()

    def __call__(self, completions: list[str], samples: list[dict]) -> Sequence[float]:
        fn = _BUILT.get(self)
        if fn is None:
            fn = _BUILT[self] = self.build(*self.args)
        return fn(completions, samples)


@dataclass(frozen=True)
class NamedReward:
    """One configured reward. `fn` is None for `remote` rewards (scored by a Ray actor)."""

    name: str
    weight: float
    fn: Optional[RewardFn]
    timeout_s: float
    fallback: float
    remote: bool = False
    # True: run in the worker process, abandoned after `timeout_s`. False (http): each request
    # waits up to `timeout_s` and is retried, so a call can take ~4 x timeout_s + 3.5 s.
    isolate: bool = True


def load_python_reward(path: str, function: str) -> RewardFn:
    """The callable `function` defined in the Python file `path`; ValueError naming what is missing."""
    file = Path(path)
    where = f"rewards: kind=python function='{path}:{function}'"
    if not file.is_file():
        raise ValueError(f"{where}: file {str(file.resolve())!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"rlhf_user_reward_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{where}: {path!r} cannot be imported as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{where}: importing the file failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{where}: the file defines no {function!r}; callables in it: {found}")
    fn = getattr(module, function)
    if not callable(fn):
        raise ValueError(f"{where}: {function!r} is a {type(fn).__name__}, not a function")
    return fn


def http_reward(url: str, timeout_s: float) -> RewardFn:
    """POST the batch as JSON to `url`; the reply must be `{"rewards": [float, ...]}`.

    Each attempt waits up to `timeout_s`. Connection errors, timeouts, 429 and 5xx are retried
    HTTP_RETRIES times with exponential backoff; other errors, and the last failure, raise.
    """

    def http_reward(completions: list[str], samples: list[dict]) -> list[float]:
        # default=str: sample metadata may hold values JSON has no type for (sets, dates)
        body = json.dumps({"completions": completions, "samples": samples}, default=str).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        for attempt in range(HTTP_RETRIES + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    reply = json.loads(response.read())
                break
            except urllib.error.HTTPError as e:
                if (e.code != 429 and e.code < 500) or attempt == HTTP_RETRIES:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == HTTP_RETRIES:
                    raise
            time.sleep(HTTP_FIRST_BACKOFF_S * 2**attempt)
        if not isinstance(reply, dict) or "rewards" not in reply:
            raise ValueError(f"{url} replied {str(reply)[:200]!r}; expected a JSON object with a 'rewards' list")
        return reply["rewards"]

    return http_reward


def _split_target(function: str) -> tuple[str, str]:
    path, _, name = function.rpartition(":")
    return path, name


def build_reward_functions(specs: list[RewardSpec], task: str | None = None) -> list[NamedReward]:
    """One NamedReward per spec, named by kind ("python:<fn>" for python; "#2", "#3" on repeats).

    `task` is the reasoning-gym task ("chain_sum" or "reasoning_gym:chain_sum") for kind
    reasoning_gym; None scores each sample with its own `metadata["source_dataset"]`. Python
    rewards are imported once in the worker process here, so a missing file or function, or one
    that is not callable, fails now with a ValueError instead of mid-run.
    """
    task = task.removeprefix("reasoning_gym:") if task else None
    rewards: list[NamedReward] = []
    for spec in specs:
        name, fn, isolate = spec.kind, None, True
        if spec.kind == "reasoning_gym":
            fn = RewardFactory(verifiers.reasoning_gym_reward, (task,))
        elif spec.kind == "math":
            fn = RewardFactory(verifiers.math_answer_reward)
        elif spec.kind == "format":
            fn = RewardFactory(verifiers.format_reward)
        elif spec.kind == "python":
            path, function = _split_target(spec.function)
            name, fn = f"python:{function}", RewardFactory(load_python_reward, (path, function))
            try:
                problem = _worker_call(_check_builds, (fn,), spec.timeout_s)
            except TimeoutError:
                problem = f"rewards: importing {spec.function!r} took longer than timeout_s={spec.timeout_s:g}"
            if problem:
                raise ValueError(problem)
        elif spec.kind == "http":
            fn, isolate = RewardFactory(http_reward, (spec.url, spec.timeout_s)), False
        elif spec.kind != "model":
            raise ValueError(f"rewards: unknown kind {spec.kind!r}")
        taken = sum(r.name == name or r.name.startswith(name + "#") for r in rewards)
        name = f"{name}#{taken + 1}" if taken else name
        rewards.append(NamedReward(name, spec.weight, fn, spec.timeout_s, spec.fallback, spec.kind == "model", isolate))
    return rewards


def combine_rewards(per_function: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """Per-sample weighted sum over reward functions: sum_k weights[k] * per_function[k][i]."""
    lengths = {name: len(values) for name, values in per_function.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward lists differ in length: {lengths}")
    missing = set(per_function) - set(weights)
    if missing:
        raise KeyError(f"no weight for rewards {sorted(missing)}; weights given for {sorted(weights)}")
    columns = [[weights[name] * v for v in values] for name, values in per_function.items()]
    return [sum(per_sample) for per_sample in zip(*columns)] if columns else []


# -------------------------------------------------------------------------------- safe running
class RewardRun(NamedTuple):
    values: list[float]  # one per completion; the reward's `fallback` where it failed
    errors: int  # samples given the fallback, for any reason
    first_error: str | None
    timeouts: int = 0  # of those errors, samples lost because the call timed out


def run_reward_function(reward: NamedReward, completions: list[str], samples: list[dict]) -> RewardRun:
    """(values, errors, first_error, timeouts) for one batch: see RewardRun.

    Never raises for the reward's failures: an exception or a timeout costs the whole batch, a
    result of the wrong length too, and each NaN, inf or non-number costs its own sample.
    """
    if reward.remote or reward.fn is None:
        raise ValueError(f"reward {reward.name!r} is scored by the reward-model actor, not run here")
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples: pass one sample per completion")
    n = len(completions)
    if n == 0:
        return RewardRun([], 0, None)
    whole_batch_failed = [reward.fallback] * n, n
    try:
        if reward.isolate:
            raw = _worker_call(_call_reward, (reward.fn, completions, samples), reward.timeout_s)
        else:
            raw = list(reward.fn(completions, samples))
    except TimeoutError:
        return RewardRun(*whole_batch_failed, f"{reward.name}: timed out after {reward.timeout_s:g}s", timeouts=n)
    except FailedInWorker as e:  # already reads "SomeError: message"
        return RewardRun(*whole_batch_failed, f"{reward.name}: {e}")
    except Exception as e:
        return RewardRun(*whole_batch_failed, f"{reward.name}: {type(e).__name__}: {e}")
    if len(raw) != n:
        return RewardRun(*whole_batch_failed, f"{reward.name}: returned {len(raw)} values for {n} completions")
    values, errors, first_error = [], 0, None
    for i, value in enumerate(raw):
        number = _as_finite_float(value)
        if number is None:
            errors += 1
            first_error = first_error or f"{reward.name}: sample {i}: {value!r} is not a finite number"
            number = reward.fallback
        values.append(number)
    return RewardRun(values, errors, first_error)


def _as_finite_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)):  # float("1") would pass; a reward must be a number
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------- the worker process
class FailedInWorker(RuntimeError):
    """The function raised inside the worker; the message is the original "Type: message"."""


def _call_reward(fn: RewardFn, completions: list[str], samples: list[dict]) -> list:
    return list(fn(completions, samples))  # a list pickles whatever sequence type fn returned


def _check_builds(fn: RewardFactory) -> str | None:
    """Build `fn` in the worker now (and keep it), so load errors surface at start-up; the error text or None."""
    try:
        _BUILT[fn] = _BUILT.get(fn) or fn.build(*fn.args)
    except ValueError as e:
        return str(e)
    return None


def _serve(conn) -> None:
    """Worker loop: say ready, then answer each (function, args) with (True, result) or (False, error)."""
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the parent is gone: exit instead of lingering
            return
        try:
            reply = (True, fn(*args))
        except Exception as e:
            reply = (False, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # e.g. a result pickle cannot carry
            conn.send((False, f"result could not be sent back: {type(e).__name__}: {e}"))


class _Worker:
    """One spawned process serving calls over a pipe; killed and replaced when a call hangs."""

    START_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy a trainer's threads and locks
        self.conn, child_conn = context.Pipe()
        # daemon: it dies with the trainer (so a user reward cannot start processes with multiprocessing)
        self.process = context.Process(target=_serve, args=(child_conn,), daemon=True, name="rlhf-reward-worker")
        self.process.start()
        child_conn.close()
        # Wait for start-up (~1 s of imports) here, so it does not eat into the first call's timeout.
        try:
            ready = self.conn.poll(self.START_TIMEOUT_S) and self.conn.recv() == "ready"
        except EOFError:  # it died while starting
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"the reward worker process did not start within {self.START_TIMEOUT_S:g}s")

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        self.conn.send((fn, args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"no result within {timeout_s:g}s")
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise ProcessLookupError(f"the reward worker process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise FailedInWorker(value)
        return value

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


_worker: _Worker | None = None
_worker_lock = threading.Lock()  # one call at a time: the pipe carries one request and its reply


def _worker_call(fn: Callable, args: tuple, timeout_s: float) -> Any:
    """fn(*args) in the worker process. TimeoutError after `timeout_s`, FailedInWorker if fn raised."""
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.process.is_alive():
            _worker = _Worker()
        try:
            return _worker.call(fn, args, timeout_s)
        except (TimeoutError, ProcessLookupError, OSError):
            # hung or died: kill it so nothing leaks; the next call spawns a fresh worker
            _worker.kill()
            _worker = None
            raise
