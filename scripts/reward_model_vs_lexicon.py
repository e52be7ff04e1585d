"""A trained reward model next to an independent judge on its own held-out pairs: how often each
ranks the preferred response first, and how often they agree (reward-model recipe's README row).

    python scripts/reward_model_vs_lexicon.py [--config recipes/configs/reward_model.yaml] [--model runs/<run>/final]

The judge is VADER (lexicon_sentiment, rlhf/evaluation/judges.py), which no model here is trained
on. Plain transformers on the CPU: 200 pairs take seconds, no Ray.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config import load_config
from rlhf.data.sources import load_preference_pairs
from rlhf.evaluation.judges import lexicon_sentiment


def reward_scores(path: str, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
    """The reward model's score per (prompt, response), encoded as actors/reward.py encodes them."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[i : i + batch_size],
                responses[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            out += model(**enc).logits[:, 0].float().tolist()
    return out


def accuracy_text(correct: list[bool]) -> str:
    p = sum(correct) / len(correct)
    return f"{100 * p:.1f}% ± {100 * math.sqrt(p * (1 - p) / len(correct)):.1f} ({sum(correct)}/{len(correct)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/reward_model.yaml")
    parser.add_argument("--model", default=None, help="the trained reward model (default runs/<run_name>/final)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    path = args.model or f"{cfg.logging.dir}/{cfg.logging.run_name}/final"
    pairs = load_preference_pairs(cfg.data, "eval")
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_scores(path, prompts, [p["chosen"] for p in pairs])
    rejected = reward_scores(path, prompts, [p["rejected"] for p in pairs])
    vader_c = lexicon_sentiment([p["chosen"] for p in pairs], pairs)
    vader_r = lexicon_sentiment([p["rejected"] for p in pairs], pairs)
    model_right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    judge_right = [c > r for c, r in zip(vader_c, vader_r, strict=True)]
    print(f"{len(pairs)} held-out pairs of {args.config} ({path})")
    print(f"  reward model ranks the preferred response first: {accuracy_text(model_right)}")
    print(f"  lexicon judge (VADER) ranks it first:            {accuracy_text(judge_right)}")
    agree = [m == j for m, j in zip(model_right, judge_right, strict=True)]
    print(f"  the two agree on:                                {accuracy_text(agree)}")


if __name__ == "__main__":
    main()
