"""Environments for the multi-turn rollout tests (test-only; `environment.module: tests.episode_environments`).

`test_behaviours` does what the row's `behaviour` says, so one batch mixes healthy and broken
episodes: "ok" answers every turn with a user message and never ends (truncation at K turns),
"raise" raises in step, "hang" sleeps far past any step deadline, "garbage" returns a string,
"bad_reset" raises in reset, "slow" takes `slow_s` seconds per step (within the deadline).
"""

from __future__ import annotations

import time
from typing import Any

from rlhf.environments import Observation, environment

HANG_S = 60.0


@environment("test_behaviours")
class Behaviours:
    """Healthy or broken on purpose, per row (tests only)."""

    def __init__(self, slow_s: float = 0.5) -> None:
        self.slow_s = slow_s
        self.behaviour = "ok"
        self.steps = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        self.behaviour = row["behaviour"]
        if self.behaviour == "bad_reset":
            raise RuntimeError("reset broke on purpose")
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, policy_text: str) -> Any:
        self.steps += 1
        if self.behaviour == "raise":
            raise RuntimeError("step broke on purpose")
        if self.behaviour == "hang":
            time.sleep(HANG_S)
        if self.behaviour == "garbage":
            return "not an observation"
        if self.behaviour == "slow":
            time.sleep(self.slow_s)
        return Observation(f"Turn {self.steps} done. Say more.", reward=0.25)

    def episode_metrics(self) -> dict[str, float]:
        return {"steps": float(self.steps)}
