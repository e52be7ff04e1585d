"""Benchmark: policy training tokens/s with token-budget micro-batches vs fixed-size ones.

    .venv/bin/python -m bench.micro_batching [--model tiny|smollm2|both] [--rows 32] [--micro-rows 8] [--budget 1024] [--repeats 2]

One PolicyActor rank (DeepSpeed, ZeRO-2, fp32 on CPU) takes GRPO steps on the same batch of rows
with an RL-like length spread (prompts of 30-90 tokens, long-tailed responses up to 256), first
with `trainer.micro_batch_size` rows per micro-batch, then with `trainer.micro_batch_tokens`.
Tokens/s counts real (unpadded) tokens per second of `train_step`; "forwarded" counts the padded
area the model actually computed. Each figure is the median of `--repeats` steps after a warm-up
forward.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def rl_like_batch(rows: int, vocab: int, seed: int = 0):
    from rlhf.batch import collate_samples

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(30, 90))] for _ in range(rows)]
    responses = [
        [rng.randrange(3, vocab) for _ in range(min(256, 8 + int(rng.expovariate(1 / 60))))] for _ in range(rows)
    ]
    return collate_samples(prompts, responses, pad_id=0)


def padded_area(groups, lengths) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def bench_model(path: str, args) -> dict[str, float]:
    import torch
    from transformers import AutoConfig

    from actors.group import ActorGroup, PlacementPlan, ray_get
    from actors.policy import PolicyActor
    from rlhf.algos import compute_loss_normalizer
    from rlhf.batch import token_budget_micro_batches
    from rlhf.config import DEFAULT_STEP_TIMEOUT_S, AlgorithmConfig, ModelSpec, ResourcesConfig, TrainerConfig

    batch = rl_like_batch(args.rows, min(AutoConfig.from_pretrained(path).vocab_size, 30000))
    batch["advantages"] = torch.randn(len(batch), 1) * batch["response_mask"]
    norm = float(compute_loss_normalizer(batch["response_mask"], "token_mean"))
    lengths = batch.sample_lengths()
    plans = {
        "padded": [list(range(i, min(i + args.micro_rows, len(batch)))) for i in range(0, len(batch), args.micro_rows)],
        "packed": token_budget_micro_batches(lengths, args.budget),
    }
    out = {"real tokens": float(sum(lengths))}
    for mode, extra in (("padded", {}), ("packed", {"micro_batch_tokens": args.budget})):
        plan = PlacementPlan.create(ResourcesConfig(policy={"cpus_per_actor": 1}), ["policy"])
        try:
            trainer = TrainerConfig(
                zero_stage=2, global_batch_size=args.rows, micro_batch_size=args.micro_rows, lr=1e-7, **extra
            )
            group = ActorGroup(
                PolicyActor,
                "policy",
                plan,
                model=ModelSpec(path=path, dtype="float32").model_dump(),
                trainer=trainer.model_dump(),
                algorithm=AlgorithmConfig(name="grpo").model_dump(),
            )
            ray_get(
                DEFAULT_STEP_TIMEOUT_S, policy=group.async_run("compute_logprobs", batch.select([0, 1]).trim())
            )  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                ray_get(DEFAULT_STEP_TIMEOUT_S, policy=group.async_run("train_step", batch, normalizer=norm))
                times.append(time.perf_counter() - start)
        finally:
            plan.shutdown()
        seconds = statistics.median(times)
        out |= {
            f"{mode}: micro-batches": float(len(plans[mode])),
            f"{mode}: forwarded tokens": float(padded_area(plans[mode], lengths)),
            f"{mode}: s/step": seconds,
            f"{mode}: tokens/s": sum(lengths) / seconds,
        }
    out["speed-up (packed / padded tokens/s)"] = out["packed: tokens/s"] / out["padded: tokens/s"]
    return out


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--micro-rows", type=int, default=8, help="padded mode: rows per micro-batch")
    parser.add_argument("--budget", type=int, default=1024, help="packed mode: tokens per micro-batch")
    parser.add_argument("--json", help="also write {model: results} to this file")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from actors.local_cluster import start_local_cluster
    from bench.rollout_and_sync import model_path

    start_local_cluster(num_cpus=os.cpu_count())  # always a fresh local cluster, even with RAY_ADDRESS set
    try:
        rows = [
            (name, bench_model(model_path(name), args))
            for name in (["tiny", "smollm2"] if args.model == "both" else [args.model])
        ]
    finally:
        ray.shutdown()
    print(
        f"\nworkload: {args.rows} rows, {args.micro_rows} rows or {args.budget} tokens per micro-batch; "
        f"median of {args.repeats} train steps; {os.cpu_count()} CPUs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows)))
    print("| metric | " + " | ".join(n for n, _ in rows) + " |\n|---|" + "---|" * len(rows))
    for k in rows[0][1]:
        print(f"| {k} | " + " | ".join(f"{r[k]:.4g}" for _, r in rows) + " |")


if __name__ == "__main__":
    main()
