"""Benchmark: synchronous vs asynchronous rollouts, side by side, and that async still learns.

    .venv/bin/python -m bench.async_rollouts [--steps 60] [--out runs/bench-async]

The tiny GRPO learning setup of tests/e2e/test_learning_sft_grpo.py: SFT from scratch (stopped
early), then GRPO from that checkpoint twice with the same seeds and config: once synchronous,
once with rollout.async_rollouts (max_staleness 1) and truncated importance sampling. Prints held-out
greedy accuracy before and after, the median step time and phases over the steps after the first
(warm-up), and the async metrics (staleness, generation hidden behind training, IS mismatch).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = (
    "time/step",
    "time/generate",
    "time/score",
    "time/train",
    "time/sync",
    "async/generate_s",
    "async/overlap_s",
    "async/overlap_fraction",
    "async/staleness",
    "mismatch/mean_abs_logprob_diff",
    "mismatch/kl_k3",
    "mismatch/truncated_fraction",
)


def medians(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r and r["step"] > 1]  # step 1 warms the engines up
    return {k: statistics.median(r[k] for r in steps) for k in KEYS if all(k in r for r in steps)}


def main() -> None:
    import ray

    from actors.launch import run
    from actors.local_cluster import init_ray
    from tests.e2e.test_learning_sft_grpo import GRPO_STEPS, grpo_config, train_sft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=GRPO_STEPS)
    parser.add_argument("--out", default="runs/bench-async")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    init_ray(num_cpus=2)  # the test suite's 2-core cluster
    sft = train_sft(out)
    modes = {"sync": {"async_rollouts": False}, "async": {"async_rollouts": True}}
    results = {}
    for name, rollout in modes.items():
        cfg = grpo_config(out, f"grpo-{name}", sft["final_path"], steps=args.steps, **rollout)
        if rollout:
            cfg.algorithm.importance_sampling.enabled = True
        result = run(cfg)
        results[name] = {
            "before": result["before"]["eval/reward/reasoning_gym"],
            "after": result["after"]["eval/reward/reasoning_gym"],
        } | medians(Path(result["run_dir"]))
    print(f"\nGRPO, {args.steps} steps, 16 prompts x 8 samples x <= 8 tokens; medians over steps 2..{args.steps}")
    print(f"| metric | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for key in ("before", "after", *KEYS):
        print(f"| {key} | {' | '.join(f'{r[key]:.4g}' if key in r else '-' for r in results.values())} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
