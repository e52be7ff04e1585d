"""Stopping an RL run whose updates keep failing (pure logic; the loop is in actors/launch.py).

A trainer rank skips any optimizer update whose loss or gradients are non-finite on some rank
(actors/trainer.py, `optimizer_step`): the weights, optimizer and LR schedule stay as they were.
The coordinator reports per step how many updates each role skipped (`nonfinite_skips`,
`critic_nonfinite_skips`). One bad batch is survivable; a role whose updates fail in
`trainer.max_nonfinite_steps` consecutive steps is not going to recover by itself, so the run
saves a checkpoint (safe: the skipped updates changed nothing) and stops with `NonFiniteError`.
"""

from __future__ import annotations

# role -> (its skip-count metric, the learning-rate field to lower)
SKIP_METRICS = {"policy": ("nonfinite_skips", "trainer.lr"), "critic": ("critic_nonfinite_skips", "trainer.critic_lr")}


class NonFiniteError(RuntimeError):
    """A role's updates were non-finite in too many consecutive steps; the run stopped."""


class NonFiniteGuard:
    """Counts, per trained role, the consecutive steps in which at least one of its updates was
    skipped for a non-finite loss or gradient. A step where the role's updates all went through
    ends its streak; a step that trained nothing (no skip metric) leaves it as it is."""

    def __init__(self, limit: int):
        self.limit = limit  # 0: never stop, only skip and count
        self.streaks: dict[str, list[int]] = {}  # role -> the steps of its current streak

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Record step `step`'s metrics; returns the roles that have now reached the limit ([]: go on)."""
        for role, (key, _) in SKIP_METRICS.items():
            if key not in metrics:
                continue
            if metrics[key] > 0:
                self.streaks.setdefault(role, []).append(step)
            else:
                self.streaks.pop(role, None)
        if not self.limit:
            return []
        return [role for role in SKIP_METRICS if len(self.streaks.get(role, ())) >= self.limit]

    def message(self, roles: list[str], checkpoint: str) -> str:
        lines = []
        for role in roles:
            steps, lr = self.streaks[role], SKIP_METRICS[role][1]
            lines.append(
                f"{role}: non-finite loss/gradients in {len(steps)} consecutive steps (steps {steps[0]}..{steps[-1]}); "
                f"those updates were skipped; last good checkpoint: {checkpoint}; lower {lr} or check the rewards"
            )
        return "\n".join(lines)
