"""What a run's held-out evaluation adds to the training reward: judges, text health, the sample
files, and the reward-hacking alarm. Pure: the coordinator generates and calls it once per pass
(greedy, sampled), then `finish` once per evaluation.

Metrics (greedy pass; the sampled pass the same under eval/sampled/):
    eval/judge/<name>, eval/judge_errors/<name>   each judge's mean score, failures (NaN) counted
    eval/health/<key>                            length, distinct_1/2, repeated_3gram, non_text
    eval/pass@k/<name>                           sampled pass with k > 1 and 0/1 scores
    eval/hacking_alarm                           1 when the alarm fired at this evaluation
    eval/alarm/reward_t, eval/alarm/judge_t/<name>   the paired t statistics since the first eval
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.evaluation.alarm import AlarmVerdict, HackingAlarm, RewardHackingError
from rlhf.evaluation.judges import build_judges
from rlhf.evaluation.scoring import ScoredPass, judge_pass, pass_metrics, sample_records, write_jsonl
from rlhf.evaluation.text_health import text_health

if TYPE_CHECKING:
    from rlhf.config import EvalConfig

log = logging.getLogger(__name__)


class HeldOutJudging:
    def __init__(self, cfg: EvalConfig, run_dir: Path | None):
        self.cfg = cfg
        self.judges = build_judges(cfg.judges, cfg.on_topic_field)
        self.alarm = HackingAlarm(cfg.alarm_reward_z, cfg.alarm_judge_z, cfg.health_floor, cfg.max_repeat_rise)
        self.run_dir = run_dir
        self.passes: list[ScoredPass] = []
        self.num_prompts = 0
        self.best_judge = cfg.best_judge or (cfg.judges[0] if cfg.judges else None)
        self.best_score = -math.inf
        self.new_best = False  # the last evaluation scored best so far by best_judge (keep_best exports it)
        self.last_verdict: AlarmVerdict | None = None

    def score(
        self,
        prefix: str,
        prompts: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        rewards: dict[str, list[float]],
        total: list[float],
    ) -> dict[str, float]:
        """Judge one pass (prefix "" greedy, "sampled/"): its eval/ metrics; kept for `finish`."""
        scored = judge_pass(self.judges, "sampled" if prefix else "greedy", prompts, samples, rewards, total)
        for name, error in scored.judge_errors.items():
            log.warning("judge %s failed on this evaluation (its scores are NaN): %s", name, error)
        self.passes.append(scored)
        self.num_prompts = len(prompts)
        return pass_metrics(scored, len(prompts), "eval/" + prefix)

    def finish(self, updates: int) -> dict[str, float]:
        """After every pass of one evaluation (`updates`: RL updates behind the weights): write the
        samples, run the alarm on the greedy pass, track the best judge score. Raises
        RewardHackingError when the alarm fired and eval.alarm_action is stop."""
        passes, self.passes = self.passes, []
        if self.cfg.save_samples and self.run_dir is not None and passes:
            records = [r for p in passes for r in sample_records(p, f"updates={updates}")]
            write_jsonl(self.run_dir / "samples" / f"eval-{updates:05d}.jsonl", records)
        greedy = next((p for p in passes if p.mode == "greedy"), None)
        if greedy is None:
            return {}
        n = self.num_prompts
        judges = {name: greedy.per_prompt(v, n) for name, v in greedy.judges.items()}
        out: dict[str, float] = {}
        self.new_best = False
        if self.best_judge is not None:
            score = sum(judges[self.best_judge]) / max(n, 1)
            if not math.isnan(score) and score > self.best_score:
                self.best_score, self.new_best = score, True
        if self.cfg.alarm_action == "off":
            return out
        verdict = self.alarm.check(
            greedy.per_prompt(greedy.total, n), judges, text_health([s["text"] for s in greedy.samples])
        )
        self.last_verdict = verdict
        out["eval/hacking_alarm"] = float(verdict.fired)
        if verdict.reward is not None:
            out["eval/alarm/reward_t"] = _finite(verdict.reward.t)
        out |= {f"eval/alarm/judge_t/{k}": _finite(v.t) for k, v in verdict.judges.items()}
        if verdict.fired:
            log.warning("%s", verdict.message())
            if self.cfg.alarm_action == "stop":
                raise RewardHackingError(verdict.message() + " (eval.alarm_action=stop)")
            if self.cfg.alarm_action == "keep_best":
                log.warning(
                    "eval.alarm_action=keep_best: the policy with the best %s so far (%.4g) is in best-by-judge/",
                    self.best_judge,
                    self.best_score,
                )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm.state_dict(), "best_score": self.best_score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alarm.load_state_dict(state.get("alarm", {}))
        self.best_score = state.get("best_score", -math.inf)


def _finite(x: float) -> float:
    return max(min(x, 1e9), -1e9)  # a t of +-inf (every prompt moved the same) stays a number on gauges
