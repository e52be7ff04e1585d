"""The environment interface: what a multi-turn episode talks to.

An environment starts an episode from a data row (`reset` -> the first messages), then answers
each of the policy's turns (`step` -> an `Observation`: the new message(s), an optional reward
for the turn, and whether the episode is over). A tool is a small environment: it answers a
call with the result. Plain Python, registered by name in ENVIRONMENTS (like reward kinds).

`safe_step` is how the rollout calls an environment: whatever the environment does (raise,
return garbage, a non-finite reward), the episode gets an Observation, ended with `error` set,
so one broken environment costs its own episode and never the batch.

Pure: no Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rlhf.registry import Entry, Registry, summary_of

Message = dict[str, Any]  # a chat message: {"role": ..., "content": ...} (tool calls may nest)
MAX_OBSERVATION_CHARS = 20_000  # longer answers are cut: an environment must not flood the context


@dataclass(frozen=True)
class Observation:
    """An environment's answer to one policy turn.

    content: the text of one new user turn, or the messages to append (e.g. a "tool" message).
    reward: this turn's reward (None: none given this turn). done: the episode is over.
    error: set by `safe_step` when the environment failed (the episode ends there).
    """

    content: str | list[Message] = ""
    reward: float | None = None
    done: bool = False
    error: str | None = None

    def messages(self) -> list[Message]:
        """The messages this observation appends ([] when there is nothing to say)."""
        if isinstance(self.content, str):
            return [{"role": "user", "content": self.content}] if self.content else []
        return list(self.content)


@runtime_checkable
class Environment(Protocol):
    """One episode's counterpart. A fresh instance per episode (it may keep the episode's state)."""

    def reset(self, row: dict[str, Any]) -> list[Message]:
        """The episode's first messages (system and/or user) for the data row `row`."""
        ...

    def step(self, policy_text: str) -> Observation:
        """Answer the policy's turn (its text, special tokens removed)."""
        ...


EnvironmentFactory = Callable[..., Environment]  # keyword settings -> a fresh environment


@dataclass(frozen=True)
class EnvironmentKind(Entry):
    make: EnvironmentFactory


ENVIRONMENTS: Registry[EnvironmentKind] = Registry("environment")


def environment(name: str) -> Callable[[EnvironmentFactory], EnvironmentFactory]:
    """Register the decorated class or factory as the environment `name`."""

    def register(make: EnvironmentFactory) -> EnvironmentFactory:
        ENVIRONMENTS.add(EnvironmentKind(name, summary_of(make), make))
        return make

    return register


def make_environment(name: str, **settings: Any) -> Environment:
    """A fresh environment `name` (ValueError with did-you-mean for an unknown name)."""
    return ENVIRONMENTS[name].make(**settings)


def import_environment_module(module: str) -> None:
    """Import `module` (dotted name) so its @environment classes register; ValueError naming it if
    it cannot be imported (trusted code: it runs in this process)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"environment.module {module!r} cannot be imported: {e}") from None


# ------------------------------------------------------------------------------ safe calling
def safe_reset(env: Environment, row: dict[str, Any]) -> tuple[list[Message], str | None]:
    """(first messages, None), or ([], error text) when reset raises or returns no valid messages."""
    try:
        messages = env.reset(row)
    except Exception as e:  # a user's environment: anything may go wrong, the batch must go on
        return [], f"reset raised {type(e).__name__}: {e}"[:1000]
    problem = _messages_problem(messages)
    if problem is None and not messages:
        problem = "reset returned no messages"
    return (list(messages), None) if problem is None else ([], f"reset: {problem}")


def safe_step(env: Environment, policy_text: str) -> Observation:
    """env.step(policy_text), checked; an error Observation (done, error set) when it raises or
    returns anything but a well-formed Observation with a finite reward or None."""
    try:
        observation = env.step(policy_text)
    except Exception as e:  # see safe_reset
        return _failed(f"step raised {type(e).__name__}: {e}")
    if not isinstance(observation, Observation):
        return _failed(f"step returned {type(observation).__name__}, not an Observation")
    reward = observation.reward
    if reward is not None and not (
        isinstance(reward, (int, float)) and not isinstance(reward, bool) and math.isfinite(reward)
    ):
        return _failed(f"step returned reward {reward!r}: not a finite number")
    if not isinstance(observation.done, bool):
        return _failed(f"step returned done={observation.done!r}: not a bool")
    if isinstance(observation.content, str):
        content: str | list[Message] = observation.content[:MAX_OBSERVATION_CHARS]
    else:
        problem = _messages_problem(observation.content)
        if problem is not None:
            return _failed(f"step: {problem}")
        content = observation.content
    return Observation(content, None if reward is None else float(reward), observation.done, observation.error)


def _failed(error: str) -> Observation:
    return Observation("", None, done=True, error=error[:1000])


def _messages_problem(messages: object) -> str | None:
    """Why `messages` is not a list of {"role": str, "content": str} (None: it is)."""
    if not isinstance(messages, list):
        return f"messages are a {type(messages).__name__}, not a list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} is not a dict with a 'role'"
        if not isinstance(message.get("content"), str) or len(message["content"]) > MAX_OBSERVATION_CHARS:
            return f"message {i} has no text 'content' (or one over {MAX_OBSERVATION_CHARS} characters)"
    return None
