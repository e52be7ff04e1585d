"""One evaluation pass, scored: rewards, judges, text health, pass@k, and one record per sample.

Used by the run's periodic held-out evaluation (actors/coordinator.py) and by the command-line
evaluator (recipes/evaluate.py). Generation happens elsewhere; `samples` are the rollout
worker's flat dicts (prompt_index, text, response_token_ids, finish_reason), k per prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.evaluation.judges import JudgeFn, run_judge
from rlhf.evaluation.stats import pass_at_k, per_prompt_means
from rlhf.evaluation.text_health import sample_health, text_health


@dataclass
class ScoredPass:
    """A pass's per-sample scores (each list: one value per sample) and what it measured."""

    mode: str  # "greedy" or "sampled"
    samples: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # the prompt row of each sample
    rewards: dict[str, list[float]]  # reward name (the run's functions, "model") -> values
    total: list[float]  # the training reward: the weighted sum of `rewards`
    judges: dict[str, list[float]] = field(default_factory=dict)
    judge_errors: dict[str, str] = field(default_factory=dict)

    def per_prompt(self, values: Sequence[float], num_prompts: int) -> list[float]:
        return per_prompt_means(list(values), [s["prompt_index"] for s in self.samples], num_prompts)


def judge_pass(
    judges: Mapping[str, JudgeFn],
    mode: str,
    prompts: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    rewards: dict[str, list[float]],
    total: list[float],
) -> ScoredPass:
    """Score `samples` (answers to `prompts`) with every judge; a failing judge gives NaN and its error."""
    rows = [prompts[s["prompt_index"]] for s in samples]
    scored = ScoredPass(mode, samples, rows, rewards, total)
    texts = [s["text"] for s in samples]
    for name, judge in judges.items():
        scored.judges[name], error = run_judge(judge, texts, rows)
        if error:
            scored.judge_errors[name] = error
    return scored


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def pass_metrics(scored: ScoredPass, num_prompts: int, prefix: str = "") -> dict[str, float]:
    """`<prefix>judge/<name>` (mean), `<prefix>judge_errors/<name>`, `<prefix>health/<key>`, and with
    k > 1 samples per prompt `<prefix>pass@k/<name>` for every 0/1-valued reward or judge (a sample
    passes at 1.0; the unbiased estimator of Chen et al.)."""
    out: dict[str, float] = {}
    for name, values in scored.judges.items():
        out[f"{prefix}judge/{name}"] = _mean(values)
        out[f"{prefix}judge_errors/{name}"] = float(name in scored.judge_errors) * len(values)
    out |= {f"{prefix}health/{k}": v for k, v in text_health([s["text"] for s in scored.samples]).items()}
    k = len(scored.samples) // max(num_prompts, 1)
    if k > 1 and len(scored.samples) == k * num_prompts:
        for name, values in list(scored.rewards.items()) + [(f"judge/{n}", v) for n, v in scored.judges.items()]:
            if values and all(v in (0.0, 1.0) for v in values):
                passed = scored.per_prompt([float(v == 1.0) * k for v in values], num_prompts)  # = correct count c
                out[f"{prefix}pass@{k}/{name.removeprefix('judge/')}"] = sum(
                    pass_at_k(k, round(c), k) for c in passed
                ) / len(passed)
    return out


def sample_records(scored: ScoredPass, label: str) -> list[dict[str, Any]]:
    """One JSON-ready record per sample: what was asked, what the model said, every score."""
    records = []
    for i, (s, row) in enumerate(zip(scored.samples, scored.rows, strict=True)):
        record: dict[str, Any] = {
            "model": label,
            "mode": scored.mode,
            "prompt_index": s["prompt_index"],
            "prompt": row["prompt"],
            "completion": s["text"],
            "reward": scored.total[i],
            "rewards": {k: v[i] for k, v in scored.rewards.items()},
            "judges": {k: (None if math.isnan(v[i]) else v[i]) for k, v in scored.judges.items()},
            "health": sample_health(s["text"]),
            "tokens": len(s.get("response_token_ids", ())),
            "finish_reason": s.get("finish_reason"),
        }
        if row.get("answer") is not None:
            record["answer"] = row["answer"]
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def samples_markdown(records: list[dict[str, Any]], limit: int = 8) -> str:
    """A few records as Markdown, for TensorBoard's text tab."""
    lines = []
    for r in records[:limit]:
        scores = ", ".join(f"{k} {v:.3g}" for k, v in (r["judges"] | {"reward": r["reward"]}).items() if v is not None)
        lines.append(f"**{r['prompt'].strip()[:300]}**\n\n> {r['completion'].strip()[:600]}\n\n({scores})\n")
    return "\n---\n".join(lines)
