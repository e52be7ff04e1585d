"""Preference pairs (JSONL: prompt, chosen, rejected) from a model's sampled answers, ranked by the
training reward (rlhf/data/sampled_pairs.py): the input of DPO on IMDB prefixes.

    python -m recipes.evaluate --config recipes/configs/grpo.yaml --split train --num-prompts 384 \\
        --samples 4 --judges none --out runs/imdb-sampled-pairs
    python scripts/sampled_pairs.py runs/imdb-sampled-pairs/samples-start.jsonl runs/imdb-sampled-pairs/pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhf.data.sampled_pairs import pairs_from_records
from rlhf.evaluation.compare import read_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="samples-<model>.jsonl from recipes.evaluate (with --samples k >= 2)")
    parser.add_argument("out", help="the pairs JSONL to write")
    parser.add_argument("--min-gap", type=float, default=0.0, help="drop prompts whose best and worst differ less")
    args = parser.parse_args(argv)
    try:
        pairs = pairs_from_records(read_records(args.samples), args.min_gap)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not pairs:
        print(f"error: {args.samples}: no prompt has two sampled answers that differ in reward", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    gap = sum(p["reward_chosen"] - p["reward_rejected"] for p in pairs) / len(pairs)
    print(f"{len(pairs)} pairs -> {args.out} (mean reward gap {gap:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
