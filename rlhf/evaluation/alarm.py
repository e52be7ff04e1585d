"""The reward-hacking alarm: the training reward climbs while the judges do not, or the text rots.

At every held-out evaluation the same prompts are scored by the training reward and by the
judges (rlhf.evaluation.judges), one score per prompt. The first evaluation is the baseline.
At each later one the change of each score since the baseline is a paired difference over the
prompts (rlhf.evaluation.stats): the alarm fires when

- the reward rose significantly (t >= reward_z) while some judge did not follow: its t stays
  under judge_z (flat) or is negative (it fell). A judge that tracks what the task wants rises
  with an honest reward; one that does not move while the reward does says the policy found
  something the reward pays for and the task does not; or
- text health collapsed: distinct-2 fell under health_floor x its baseline while the texts kept
  at least half their length and two words on average (one-word answers have no word pairs),
  or the share of repeated 3-grams rose by more than max_repeat_rise.

What the run does then is `eval.alarm_action`: warn (log, metric), stop, or keep_best (the
policy with the best judge score so far is exported to best-by-judge/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf.evaluation.stats import Paired, paired_difference


class RewardHackingError(RuntimeError):
    """eval.alarm_action=stop and the reward-hacking alarm fired."""


@dataclass
class AlarmVerdict:
    fired: bool
    reasons: list[str]
    reward: Paired | None = None
    judges: dict[str, Paired] = field(default_factory=dict)

    def message(self) -> str:
        return (
            "REWARD HACKING? " + "; ".join(self.reasons) + ". Read the eval samples (samples/*.jsonl) before "
            "trusting this run's reward."
        )


@dataclass
class HackingAlarm:
    """Compare each evaluation with the first. `check` returns the verdict; `baseline` is set on the first call."""

    reward_z: float = 2.0
    judge_z: float = 1.0
    health_floor: float = 0.5
    max_repeat_rise: float = 0.25
    baseline: dict[str, list[float]] | None = None
    baseline_health: dict[str, float] | None = None

    def check(
        self,
        reward: list[float],
        judges: dict[str, list[float]],
        health: dict[str, float],
    ) -> AlarmVerdict:
        """reward: (P,) the training reward per eval prompt; judges: name -> (P,) scores of the same
        prompts; health: rlhf.evaluation.text_health of the eval's texts."""
        now = {"reward": reward} | {f"judge/{k}": v for k, v in judges.items()}
        if self.baseline is None:
            self.baseline, self.baseline_health = now, dict(health)
            return AlarmVerdict(False, [])
        reasons: list[str] = []
        up = paired_difference(self.baseline["reward"], reward)
        verdict = AlarmVerdict(False, reasons, up)
        if up.t >= self.reward_z:
            for name, scores in judges.items():
                before = self.baseline.get(f"judge/{name}")
                if before is None or any(math.isnan(x) for x in before + scores):
                    continue  # a judge that failed now or at the baseline cannot testify
                moved = paired_difference(before, scores)
                verdict.judges[name] = moved
                if moved.t < self.judge_z:
                    how = "fell" if moved.t < 0 else "stayed flat"
                    reasons.append(
                        f"the training reward rose {up.text()} since the first evaluation while judge "
                        f"{name!r} {how}: {moved.text()}"
                    )
        base = self.baseline_health or {}
        if collapsed := self._diversity_collapse(base, health):
            reasons.append(collapsed)
        rep = health.get("repeated_3gram")
        if "repeated_3gram" in base and rep is not None and rep - base["repeated_3gram"] > self.max_repeat_rise:
            reasons.append(
                f"text health collapsed: repeated 3-grams {base['repeated_3gram']:.3f} -> {rep:.3f} "
                f"of each text (rise over {self.max_repeat_rise:g})"
            )
        verdict.fired = bool(reasons)
        return verdict

    def _diversity_collapse(self, base: dict[str, float], health: dict[str, float]) -> str | None:
        """distinct-2 under health_floor x the baseline's, while the texts have word pairs to count."""
        now, before = health.get("distinct_2"), base.get("distinct_2", 0.0)
        # Shorter texts have fewer distinct pairs without being degenerate (an RLVR policy that learns
        # to answer just the number): distinct-2 counts only while the texts keep half their length,
        # and not at all once they average under two words (one-word answers have no pairs, so a
        # distinct-2 of 0; whether one word is right is for the judges to say).
        length, base_length = health.get("length", 0.0), base.get("length", 0.0)
        if before <= 0 or now is None or length < max(2.0, 0.5 * base_length) or now >= self.health_floor * before:
            return None
        return (
            f"text health collapsed: distinct-2 {before:.3f} -> {now:.3f} "
            f"(under {self.health_floor:g} x the first evaluation's)"
        )

    def state_dict(self) -> dict[str, object]:
        return {"baseline": self.baseline, "baseline_health": self.baseline_health}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.baseline = state.get("baseline")  # type: ignore[assignment]
        self.baseline_health = state.get("baseline_health")  # type: ignore[assignment]
