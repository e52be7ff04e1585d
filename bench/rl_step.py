"""Benchmark: a short GRPO run through the whole system (`actors.launch.run`, as a recipe runs
it), its step time broken into phases, samples/s and peak memory per role.

    .venv/bin/python -m bench.rl_step [--model tiny|smollm2] [--prompts 8] [--samples 4] [--tokens 32] [--steps 4] [--async-rollouts]
        [--shared-prompt auto|on|off] [--full-logits] [--json out.json]

The workload (shared with bench.trl_grpo, so both sides run the same one): reasoning-gym
chain_sum (2-3 one-digit terms) in the model's chat template, `--prompts` prompts x `--samples`
samples x <= `--tokens` new tokens per step at temperature 1, scored by the task's verifier;
GRPO advantages, KL to a frozen reference as a k3 loss term (coef 0.04), one optimizer step on
all samples of a step in micro-batches of 8, fp32, policy / reference / rollout actors on 0.5 CPU
each. Step wall time comes from the run's own metrics.jsonl (the run clock at each step's log
line); "other" is that minus the timed phases. Medians over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TASK_KWARGS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
PROMPT_SUFFIX = " Give only the final number."
KL_COEF, LR, MICRO_BATCH, TRAIN_SIZE = 0.04, 1e-6, 8, 256


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per sample")
    parser.add_argument("--steps", type=int, default=4, help="steps; the first is left out of the medians")


def add_forward_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-prompt", choices=["auto", "on", "off"], help="trainer.shared_prompt (default: the config's)"
    )
    parser.add_argument(
        "--full-logits", action="store_true", help="trainer.response_only_logits=false (the old forward)"
    )


def workload_config(path: str, args, run_dir: str, async_rollouts: bool = False):
    from rlhf.config import load_config

    batch = args.prompts * args.samples
    return load_config(
        base={
            "models": {"policy": {"path": path, "dtype": "float32"}},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": TASK_KWARGS,
                "prompt_suffix": PROMPT_SUFFIX,
                "train_size": TRAIN_SIZE,
                "eval_size": 0,
                "max_prompt_len": 128,
                "max_response_len": args.tokens,
            },
            "algorithm": {
                "name": "grpo",
                "advantage": "grpo",
                "kl": {"coef": KL_COEF, "estimator": "k3", "mode": "loss"},
            },
            "rollout": {
                "prompts_per_step": args.prompts,
                "samples_per_prompt": args.samples,
                "temperature": 1.0,
                "max_new_tokens": args.tokens,
                "eval_samples": 0,
                "async_rollouts": async_rollouts,
            },
            "rewards": [{"kind": "reasoning_gym"}],
            "trainer": {
                "zero_stage": 2,
                "lr": LR,
                "global_batch_size": batch,
                "micro_batch_size": min(MICRO_BATCH, batch),
                "total_steps": args.steps,
                **({"shared_prompt": args.shared_prompt} if getattr(args, "shared_prompt", None) else {}),
                **({"response_only_logits": False} if getattr(args, "full_logits", False) else {}),
            },
            "resources": {role: {"cpus_per_actor": 0.5} for role in ("policy", "reference", "rollout")},
            "logging": {"dir": run_dir, "run_name": "bench"},
        }
    )


def async_implemented() -> bool:
    """Whether the runtime reads rollout.async_rollouts at all (the config field alone does nothing)."""
    root = Path(__file__).resolve().parent.parent / "actors"
    return any("async_rollouts" in f.read_text() for f in root.glob("*.py"))


def bench_rl(path: str, args, async_rollouts: bool = False) -> dict:
    from actors.launch import run
    from bench.monitor import Monitor
    from bench.stats import PHASES, step_breakdown, step_walls

    run_dir = tempfile.mkdtemp(prefix="raylhf-bench-")
    try:
        cfg = workload_config(path, args, run_dir, async_rollouts)
        with Monitor() as monitor:
            run(cfg)
        lines = [json.loads(x) for x in (Path(run_dir) / "bench" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    steps = [x for x in lines if "time/step" in x]  # leaves out the evaluation lines
    walls = step_walls([x["time"] for x in steps])
    out = {f"time/{k}": v for k, v in step_breakdown(walls, steps).items()}
    out["step_walls"] = walls  # every step, the warm-up included: to see the spread
    out["step_phases"] = [sum(x.get(f"time/{p}", 0.0) for p in PHASES) for x in steps]
    per_step = args.prompts * args.samples
    out["samples_per_s"] = per_step / out["time/step"]
    out["generated_tokens_per_step"] = sum(x["response_length/mean"] * x["samples"] for x in steps[1:]) / (
        len(steps) - 1
    )
    out |= {f"peak_rss_mib/{role}": mib for role, mib in sorted(monitor.peak_mib.items())}
    out["others_cores"] = monitor.others_cores
    skipped = [x["shared_prompt/tokens_skipped"] for x in steps[1:] if "shared_prompt/tokens_skipped" in x]
    if skipped:  # share of the policy's training tokens that shared-prompt packing did not run
        out["shared_prompt/tokens_skipped"] = sum(skipped) / len(skipped)
    # what the async implementation reports about itself (staleness, overlap), if it does
    for key in sorted({k for x in steps for k in x if "stale" in k or "overlap" in k}):
        out[key] = sum(x.get(key, 0.0) for x in steps[1:]) / (len(steps) - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    add_workload_args(parser)
    add_forward_args(parser)
    parser.add_argument("--async-rollouts", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from bench.rollout_and_sync import model_path

    if args.async_rollouts and not async_implemented():
        out = {"not_implemented": 1.0}
    else:
        out = bench_rl(model_path(args.model), args, args.async_rollouts)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
