"""Preference pairs from the policy's own samples, ranked by the training reward (the DPO paper's
IMDB setting: prefixes continued by the starting model, pairs labelled by a sentiment model).

Input: the sample records `recipes.evaluate` writes (samples-<model>.jsonl, k sampled answers
per prompt, each with its training `reward`). Per prompt, the best-rewarded answer is `chosen`
and the worst `rejected`; prompts whose best and worst differ by less than `min_gap` carry no
preference and are dropped. Only the training reward decides: judges in the records are ignored,
so a judge stays independent of what DPO learns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def pairs_from_records(records: Iterable[dict[str, Any]], min_gap: float = 0.0) -> list[dict[str, Any]]:
    """[{prompt, chosen, rejected, reward_chosen, reward_rejected}] in prompt order, one per prompt with
    at least two non-blank sampled answers whose rewards differ by >= min_gap (and by more than 0)."""
    by_prompt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        reward = r.get("reward")
        if r.get("mode") != "sampled" or reward is None or math.isnan(float(reward)) or not r["completion"].strip():
            continue
        by_prompt[int(r["prompt_index"])].append(r)
    pairs = []
    for index in sorted(by_prompt):
        answers = sorted(by_prompt[index], key=lambda r: float(r["reward"]))
        worst, best = answers[0], answers[-1]
        gap = float(best["reward"]) - float(worst["reward"])
        if len(answers) < 2 or gap <= 0 or gap < min_gap:
            continue
        pairs.append(
            {
                "prompt": best["prompt"],
                "chosen": best["completion"],
                "rejected": worst["completion"],
                "reward_chosen": float(best["reward"]),
                "reward_rejected": float(worst["reward"]),
            }
        )
    return pairs
