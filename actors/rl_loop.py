"""RL (PPO, GRPO, RLVR) as a training loop for the driver (actors/driver.py).

The coordinator (actors/coordinator.py) does the work of a step; this adds what the outer loop
needs around it: the prompts (train and held-out), the position in the prompt stream that a
checkpoint saves, and export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from actors.group import ray_get
from rlhf.config import RunConfig
from rlhf.data.sources import load_prompts
from rlhf.data.stream import PromptStream

log = logging.getLogger("raylhf")


class RLLoop:
    progress_keys = ("reward/mean", "kl", "policy_loss", "time/generate", "time/train")
    sink_role = "coordinator"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.coordinator = None

    def setup(self) -> None:
        from actors.coordinator import RLCoordinator

        cfg = self.cfg
        train, self.heldout = load_prompts(cfg.data, "train", cfg.rewards), load_prompts(cfg.data, "eval", cfg.rewards)
        log.info("data: %d train prompts, %d held-out prompts from %s", len(train), len(self.heldout), cfg.data.source)
        self.stream = PromptStream(train, cfg.data.seed)
        self.coordinator = RLCoordinator(cfg)

    def step(self, step: int) -> dict[str, float]:
        metrics = self.coordinator.step(self.stream.next, step)
        # prompts taken from the training stream so far (a checkpoint restores it): a prompt lost or
        # drawn twice after a failure shows as a count off by its size, not only in `samples`
        return metrics | {"data/prompts_drawn": float(self.stream.position)}

    def evaluate(self) -> dict[str, float]:
        return self.coordinator.evaluate(self.heldout) if self.heldout else {}

    def save_state(self, folder: Path) -> dict[str, Any]:
        return self.coordinator.save_checkpoint(folder) | {"data_position": self.stream.position}

    def load_state(self, folder: Path, state: dict[str, Any]) -> None:
        self.coordinator.load_checkpoint(folder, state)
        self.stream.position = state["data_position"]

    def export(self, path: Path) -> str:
        ray_get(self.cfg.trainer.step_timeout_s, policy=self.coordinator.policy.async_run("save_pretrained", str(path)))
        return str(path)

    def dead_actors(self) -> list[str]:
        return self.coordinator.dead_actors() if self.coordinator else []

    def shutdown(self) -> None:
        if self.coordinator is not None:
            self.coordinator.shutdown()
