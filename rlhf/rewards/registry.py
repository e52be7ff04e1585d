"""Turn the config's `rewards:` list into reward functions, and run them so a bad one cannot stop a run.

A reward function is a plain callable `(completions, samples) -> list[float]` (TRL style; see
rlhf.rewards.verifiers). Each RewardSpec kind is one `@reward_kind` builder in `REWARD_KINDS`
(the same Registry mechanism as the algorithms', rlhf/registry.py; the config checks kinds
against it), and `build_reward_functions` calls the builder of each spec:

    reasoning_gym  the task's own scorer (task from data.source, else each sample's metadata)
    math           math_answer_reward (math-verify against sample["answer"])
    format         format_reward (the completion is just a number)
    python         `function: path/to/file.py:name`, a function in a user's file
    model          scored by the reward-model Ray actor elsewhere: `remote=True`, no function here
    http           POST {"completions": [...], "samples": [...]} to `url`, read {"rewards": [...]}

`run_reward_function` never raises for a reward's failure and loses no sample: each sample gets
its reward or the spec's `fallback`, and every fallback is counted with the first error's text.

Every function runs in a sandbox process of its own (rlhf.rewards.sandbox: resource limits, no
network unless asked, `nobody` when started as root, killed as a whole at the deadline); it is
named by `RewardFactory` ("module:builder" plus JSON arguments) and its results come back as
JSON, checked here. One call has one deadline, `timeout_s`, for everything (HTTP retries too).
When a python reward raises on a batch, the sandbox retries each sample alone within that same
deadline, and only the samples that raise again get the fallback; a timeout costs the batch.
"""

from __future__ import annotations

import atexit
import http.client
import importlib
import json
import math
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rlhf.registry import Entry, Registry, summary_of
from rlhf.rewards.sandbox import Sandbox, SandboxError, SandboxLimits

if TYPE_CHECKING:
    from rlhf.config import RewardSpec

RewardFn = Callable[[list[str], list[dict[str, Any]]], list[float]]
HTTP_RETRIES = 3
HTTP_FIRST_BACKOFF_S = 0.5
HTTP_MAX_REPLY_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------ reward functions
_BUILT: dict[RewardFactory, RewardFn] = {}  # in-process use only (tests, scripts): built once


@dataclass(frozen=True)
class RewardFactory:
    """A reward function by name: `build` ("module:function") called with `args` (JSON values)
    makes it. This is what crosses to the sandbox, as JSON; calling it here builds it in-process."""

    build: str
    args: tuple[object, ...] = ()  # JSON values

    def __call__(self, completions: list[str], samples: list[dict[str, Any]]) -> Sequence[float]:
        fn = _BUILT.get(self)
        if fn is None:
            module, _, name = self.build.partition(":")
            fn = _BUILT[self] = getattr(importlib.import_module(module), name)(*self.args)
        return fn(completions, samples)


@dataclass(frozen=True)
class NamedReward:
    """One configured reward. `fn` is None for `remote` rewards (scored by a Ray actor)."""

    name: str
    weight: float
    fn: RewardFactory | None
    timeout_s: float  # one deadline per call, retries and per-sample retries included
    fallback: float
    remote: bool = False
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    trusted: bool = True  # our code (built before the sandbox drops privileges); False: a user's file
    retry_alone: bool = False  # a batch that raises is retried one sample at a time (python rewards)


def load_python_reward(path: str, function: str, source: str | None = None) -> RewardFn:
    """The callable `function` defined in the Python file `path` (whose text is `source` when
    given: the sandbox may not be allowed to read the file); ValueError naming what is missing."""
    where = f"rewards: kind=python function='{path}:{function}'"
    if source is None:
        source = read_reward_file(path, function)
    module = types.ModuleType(f"rlhf_user_reward_{Path(path).stem}")
    module.__file__ = path
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except Exception as e:
        raise ValueError(f"{where}: importing the file failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{where}: the file defines no {function!r}; callables in it: {found}")
    fn: RewardFn = getattr(module, function)  # a user's: what it returns is checked (checked_reply)
    if not callable(fn):
        raise ValueError(f"{where}: {function!r} is a {type(fn).__name__}, not a function")
    return fn


def read_reward_file(path: str, function: str) -> str:
    file = Path(path)
    where = f"rewards: kind=python function='{path}:{function}'"
    if not file.is_file():
        raise ValueError(f"{where}: file {str(file.resolve())!r} does not exist")
    if file.suffix != ".py":
        raise ValueError(f"{where}: {path!r} cannot be imported as a Python module (is it a .py file?)")
    try:
        return file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read the file: {type(e).__name__}: {e}") from e


def http_reward(url: str, timeout_s: float, first_backoff_s: float = HTTP_FIRST_BACKOFF_S) -> RewardFn:
    """POST the batch as JSON to `url`; the reply must be `{"rewards": [float, ...]}`.

    One deadline, `timeout_s`, for the whole call: connecting, every read, the retries and the
    waits between them (a server that drips its reply a byte at a time runs out of it too; the
    sandbox's kill at the same deadline backs this up). Connection errors, timeouts, 429 and
    5xx are retried up to HTTP_RETRIES times with exponential backoff; the rest raise.
    """

    def http_reward(completions: list[str], samples: list[dict[str, Any]]) -> list[float]:
        # default=str: sample metadata may hold values JSON has no type for (sets, dates)
        body = json.dumps({"completions": completions, "samples": samples}, default=str).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + timeout_s
        for attempt in range(HTTP_RETRIES + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{url}: no reply within timeout_s={timeout_s:g} ({attempt} attempts)")
            try:
                with urllib.request.urlopen(request, timeout=left) as response:
                    reply = json.loads(_read_before(response, deadline, url))
                break
            except urllib.error.HTTPError as e:
                if (e.code != 429 and e.code < 500) or attempt == HTTP_RETRIES:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == HTTP_RETRIES:
                    raise
            time.sleep(max(0.0, min(first_backoff_s * 2**attempt, deadline - time.monotonic())))
        if not isinstance(reply, dict) or "rewards" not in reply:
            raise ValueError(f"{url} replied {str(reply)[:200]!r}; expected a JSON object with a 'rewards' list")
        rewards: list[float] = reply["rewards"]  # checked by the caller (checked_reply)
        return rewards

    return http_reward


def _read_before(response: http.client.HTTPResponse, deadline: float, url: str) -> bytes:
    """The body, read a chunk at a time while time is left and under HTTP_MAX_REPLY_BYTES."""
    body = b""
    while chunk := response.read1(65536):
        body += chunk
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: the reply was still arriving at the deadline ({len(body)} bytes so far)")
        if len(body) > HTTP_MAX_REPLY_BYTES:
            raise ValueError(f"{url}: reply over {HTTP_MAX_REPLY_BYTES} bytes")
    return body


def _split_target(function: str) -> tuple[str, str]:
    path, _, name = function.rpartition(":")
    return path, name


def sandbox_limits(spec: RewardSpec, network: bool) -> SandboxLimits:
    return SandboxLimits(
        memory_mb=spec.memory_mb,
        cpu_time_s=spec.cpu_time_s,
        max_processes=spec.max_processes,
        max_open_files=spec.max_open_files,
        max_file_mb=spec.max_file_mb,
        network=network,
    )


# ------------------------------------------------------------------------------- reward kinds
class RewardBuild(NamedTuple):
    """What a kind's builder makes of one spec."""

    fn: RewardFactory | None  # None: scored elsewhere (the kind is registered remote)
    name: str | None = None  # the reward's name in metrics; default: the kind
    trusted: bool = True  # our code; False: a user's file (imported now, in its sandbox, to fail early)
    network: bool = False  # the sandbox gets network access
    retry_alone: bool = False  # a batch that raises is retried one sample at a time


RewardBuilder = Callable[["RewardSpec", "str | None"], RewardBuild]  # (spec, reasoning-gym task)


@dataclass(frozen=True)
class RewardKind(Entry):
    build: RewardBuilder
    remote: bool = False  # scored by the reward-model actor (models.reward), not by a function here


REWARD_KINDS: Registry[RewardKind] = Registry("reward kind")


def reward_kind(name: str, *, remote: bool = False) -> Callable[[RewardBuilder], RewardBuilder]:
    """Register the decorated builder as the reward kind `name` (rewards[i].kind)."""

    def register(build: RewardBuilder) -> RewardBuilder:
        REWARD_KINDS.add(RewardKind(name, summary_of(build), build, remote))
        return build

    return register


@reward_kind("reasoning_gym")
def _reasoning_gym(spec: RewardSpec, task: str | None) -> RewardBuild:
    """The reasoning-gym task's own verifier (task from data.source, else each sample's metadata)."""
    return RewardBuild(RewardFactory("rlhf.rewards.verifiers:reasoning_gym_reward", (task,)))


@reward_kind("math")
def _math(spec: RewardSpec, task: str | None) -> RewardBuild:
    """1 if math-verify finds the completion's answer equal to the sample's answer."""
    return RewardBuild(RewardFactory("rlhf.rewards.verifiers:math_answer_reward"))


@reward_kind("format")
def _format(spec: RewardSpec, task: str | None) -> RewardBuild:
    """1 if the completion is just a number."""
    return RewardBuild(RewardFactory("rlhf.rewards.verifiers:format_reward"))


@reward_kind("python")
def _python(spec: RewardSpec, task: str | None) -> RewardBuild:
    """`function: path/to/file.py:name`, a function in a user's file, in a sandbox."""
    path, function = _split_target(spec.function or "")
    path = str(Path(path).resolve())  # the sandbox runs elsewhere
    source = read_reward_file(path, function)
    fn = RewardFactory("rlhf.rewards.registry:load_python_reward", (path, function, source))
    return RewardBuild(fn, f"python:{function}", trusted=False, network=spec.network, retry_alone=True)


@reward_kind("model", remote=True)
def _model(spec: RewardSpec, task: str | None) -> RewardBuild:
    """The reward model of models.reward, on its Ray actor."""
    return RewardBuild(None)


@reward_kind("http")
def _http(spec: RewardSpec, task: str | None) -> RewardBuild:
    """POST the completions and samples as JSON to `url`; the reply holds the rewards."""
    args = (spec.url, spec.timeout_s, HTTP_FIRST_BACKOFF_S)
    return RewardBuild(RewardFactory("rlhf.rewards.registry:http_reward", args), network=True)


def build_reward_functions(specs: list[RewardSpec], task: str | None = None) -> list[NamedReward]:
    """One NamedReward per spec, named by kind ("python:<fn>" for python; "#2", "#3" on repeats).

    `task` is the reasoning-gym task ("chain_sum" or "reasoning_gym:chain_sum") for kind
    reasoning_gym; None scores each sample with its own `metadata["source_dataset"]`. A user's
    reward (kind python) starts its sandbox here, so a missing file or function, one that is not
    callable, or a file that fails to import fails now with a ValueError instead of mid-run.
    """
    task = task.removeprefix("reasoning_gym:") if task else None
    rewards: list[NamedReward] = []
    for spec in specs:
        kind = REWARD_KINDS[spec.kind]
        built = kind.build(spec, task)
        name = built.name or spec.kind
        taken = sum(r.name == name or r.name.startswith(name + "#") for r in rewards)
        name = f"{name}#{taken + 1}" if taken else name
        reward = NamedReward(
            name,
            spec.weight,
            built.fn,
            spec.timeout_s,
            spec.fallback,
            kind.remote,
            sandbox_limits(spec, built.network),
            built.trusted,
            retry_alone=built.retry_alone,
        )
        if not built.trusted:
            try:
                _sandbox(reward).start()
            except TimeoutError:
                raise ValueError(f"rewards: importing {spec.function!r} did not finish in time") from None
            except SandboxError as e:
                raise ValueError(f"rewards: {spec.function!r}: {e}") from None
        rewards.append(reward)
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


def run_reward_function(reward: NamedReward, completions: list[str], samples: list[dict[str, Any]]) -> RewardRun:
    """(values, errors, first_error, timeouts) for one batch: see RewardRun.

    Never raises for the reward's failures. A timeout, a dead or misbehaving sandbox, or a
    result that is not a list of n values costs the whole batch; each NaN, inf or non-number
    costs its own sample, and so does each sample that raises when retried alone (python).
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
        reply = _sandbox(reward).call(completions, samples, reward.timeout_s)
    except TimeoutError:
        return RewardRun(*whole_batch_failed, f"{reward.name}: timed out after {reward.timeout_s:g}s", timeouts=n)
    except (SandboxError, ValueError, OSError) as e:  # ValueError: it failed to start (a user's file broke since)
        return RewardRun(*whole_batch_failed, f"{reward.name}: {e}")
    values, messages = checked_reply(reply, n)
    errors = [i for i, v in enumerate(values) if v is None]
    first_error = messages[0] if messages else None
    if first_error:
        first_error = f"{reward.name}: {first_error}"
    return RewardRun([reward.fallback if v is None else v for v in values], len(errors), first_error)


def checked_reply(reply: dict[str, Any], n: int) -> tuple[list[float | None], list[str]]:
    """(n finite floats or None, error messages) from a sandbox reply, trusting nothing in it."""
    values, errors, batch_error = reply.get("values"), reply.get("errors"), reply.get("batch_error")
    if not isinstance(values, list) or len(values) != n:
        return [None] * n, ["the reward sandbox sent a malformed reply (no list of values)"]
    checked = [float(v) if _is_finite_number(v) else None for v in values]
    messages = [str(batch_error)[:1000]] if batch_error is not None else []
    if isinstance(errors, list):
        messages += [str(e[1])[:1000] for e in errors if isinstance(e, list) and len(e) == 2]
    if any(v is None for v in checked) and not messages:
        messages = [f"sample {checked.index(None)}: the reward sandbox sent no number"]
    return checked, messages


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------- sandboxes
_sandboxes: dict[tuple[RewardFactory, SandboxLimits, bool, bool], Sandbox] = {}
_sandboxes_lock = threading.Lock()


def _sandbox(reward: NamedReward) -> Sandbox:
    """The sandbox of this reward (one per function and limits, shared by equal rewards); not started yet."""
    if reward.fn is None:
        raise ValueError(f"reward {reward.name!r} is scored by the reward-model actor: it has no sandbox")
    key = (reward.fn, reward.limits, reward.trusted, reward.retry_alone)
    with _sandboxes_lock:
        if key not in _sandboxes:
            _sandboxes[key] = Sandbox(
                reward.fn.build, reward.fn.args, reward.limits, reward.trusted, reward.retry_alone
            )
        return _sandboxes[key]


@atexit.register
def shutdown_sandboxes() -> None:
    """Kill every reward sandbox of this process (they also die with it: PR_SET_PDEATHSIG)."""
    with _sandboxes_lock:
        for sandbox in _sandboxes.values():
            sandbox.kill()
