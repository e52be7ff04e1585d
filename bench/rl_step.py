"""Benchmark: a short GRPO run through the whole system (`actors.launch.run`, as a recipe runs
it), its step time broken into phases, samples/s and peak memory per role.

    .venv/bin/python -m bench.rl_step [--model tiny|smollm2] [--prompts 8] [--samples 4] [--max-new-tokens 32]
        [--steps 4] [--async-rollouts] [--grad-checkpointing off|on] [--dtype fp32|bf16] [--lora]
        [--threads N] [--shared-prompt auto|on|off] [--full-logits] [--json out.json]

The workload (shared with bench.trl_grpo, so both sides run the same one): reasoning-gym
chain_sum (2-3 one-digit terms) in the model's chat template, `--prompts` prompts x `--samples`
samples x <= `--max-new-tokens` new tokens per step at temperature 1, scored by the task's
verifier; GRPO advantages, KL to a frozen reference as a k3 loss term (coef 0.04), one optimizer
step on all samples of a step in micro-batches of bench.workload.micro_batch_rows(batch) rows
(the largest divisor of the batch <= 8), fp32 (`--dtype bf16`: bf16 weights and compute, DeepSpeed's
fp32 master weights; the engines follow), full fine-tuning (`--lora`: rank-16 adapters on every
projection, the reference = adapters off, so no reference process), policy / reference / rollout actors on 0.5 CPU
each with `--threads` torch threads (RAYLHF_CPU_THREADS). Step wall time comes from the run's own
metrics.jsonl (the run clock at each step's log line); "other" is that minus the timed phases.
Medians over the steps after the first. Samples/s counts the samples each step trained (the
metrics' `samples`: the rows of the batch the step trained on); a step that trained other than
prompts x samples makes the run fail instead of being counted. `--grad-checkpointing on` is
trainer.gradient_checkpointing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.threads import use_threads

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TASK_KWARGS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
PROMPT_SUFFIX = " Give only the final number."
KL_COEF, LR = 0.04, 1e-6
LORA = {"rank": 16, "alpha": 32.0}  # --lora on both sides; target modules: our config's default (every projection)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload and settings flags both sides take (this part and bench.trl_grpo)."""
    from bench.threads import add_threads_arg

    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument(
        "--max-new-tokens", "--tokens", dest="max_new_tokens", type=int, default=32, help="max new tokens per sample"
    )
    parser.add_argument("--steps", type=int, default=4, help="steps; the first is left out of the medians")
    parser.add_argument(
        "--grad-checkpointing",
        choices=["off", "on"],
        default="off",
        help="recompute activations in the backward pass (less memory, more compute); TRL's default is on",
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: bf16 weights and compute with fp32 master weights (ours: DeepSpeed bf16; TRL: bf16 autocast)",
    )
    parser.add_argument("--lora", action="store_true", help="train rank-16 LoRA adapters instead of all weights")
    add_threads_arg(parser)


def workload_of(args):
    from bench.workload import Workload

    return Workload(args.prompts, args.samples, args.max_new_tokens)


def add_forward_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-prompt", choices=["auto", "on", "off"], help="trainer.shared_prompt (default: the config's)"
    )
    parser.add_argument(
        "--full-logits", action="store_true", help="trainer.response_only_logits=false (the old forward)"
    )


def workload_config(path: str, args, run_dir: str, async_rollouts: bool = False):
    from bench.workload import MAX_PROMPT_TOKENS, TRAIN_PROMPTS, micro_batch_rows
    from rlhf.config import load_config

    w = workload_of(args)
    trainer = {
        "zero_stage": getattr(args, "zero_stage", "auto"),
        "lr": LR,
        "global_batch_size": w.batch,
        "micro_batch_size": micro_batch_rows(w.batch),
        "total_steps": args.steps,
        "gradient_checkpointing": args.grad_checkpointing == "on",
    }
    if getattr(args, "shared_prompt", None):  # the --shared-prompt comparison's forwards
        trainer["shared_prompt"] = args.shared_prompt
    if getattr(args, "full_logits", False):
        trainer["response_only_logits"] = False
    policy = {"path": path, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]}  # the reference follows
    if args.lora:
        policy["lora"] = LORA
    return load_config(
        base={
            "models": {"policy": policy},
            "data": {
                "source": "reasoning_gym:chain_sum",
                "task_kwargs": TASK_KWARGS,
                "prompt_suffix": PROMPT_SUFFIX,
                "train_size": TRAIN_PROMPTS,
                "eval_size": 0,
                "max_prompt_len": MAX_PROMPT_TOKENS,
                "max_response_len": w.max_new_tokens,
            },
            "algorithm": {
                "name": "grpo",
                "advantage": "grpo",
                "kl": {"coef": KL_COEF, "estimator": "k3", "mode": "loss"},
            },
            "rollout": {
                "prompts_per_step": w.prompts,
                "samples_per_prompt": w.samples,
                "temperature": 1.0,
                "max_new_tokens": w.max_new_tokens,
                "eval_samples": 0,
                "async_rollouts": async_rollouts,
                "overlap_reference": bool(getattr(args, "overlap_reference", False)),
            },
            "rewards": [{"kind": "reasoning_gym"}],
            "trainer": trainer,
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
    from bench.workload import micro_batch_rows, trained_samples_per_s

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
    w = workload_of(args)
    trained = [float(x.get("samples", 0.0)) for x in steps[1:]]  # a skipped step trained nothing
    out["samples_per_s"] = trained_samples_per_s("ours", w, walls[1:], trained)  # refuses a short step
    out["trained_samples_per_step"] = trained
    out["generated_tokens_per_step"] = sum(x["response_length/mean"] * x["samples"] for x in steps[1:]) / (
        len(steps) - 1
    )
    out["micro_batch_rows"] = float(micro_batch_rows(w.batch))
    out["grad_checkpointing"] = args.grad_checkpointing
    out["dtype"], out["lora"] = args.dtype, "on" if args.lora else "off"
    out["zero_stage"] = float(cfg.trainer.stage_for(1))  # the stage the one policy rank ran
    out["threads"] = float(args.threads)
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
    parser.add_argument(
        "--zero-stage",
        type=lambda v: v if v == "auto" else int(v),
        choices=["auto", 0, 1, 2, 3],
        default="auto",
        help="trainer.zero_stage (default auto, as the main job: 0 on the one policy rank here)",
    )
    parser.add_argument(
        "--overlap-reference",
        action="store_true",
        help="with --async-rollouts: rollout.overlap_reference=true (the next step's reference log-probs "
        "while the policy trains)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    use_threads(args.threads)  # the actors inherit RAYLHF_CPU_THREADS from this process
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoConfig

    from bench.rollout_and_sync import model_path
    from bench.workload import WorkloadError, validate

    path = model_path(args.model)
    try:
        validate(workload_of(args), AutoConfig.from_pretrained(path).max_position_embeddings, args.steps)
        if args.async_rollouts and not async_implemented():
            out = {"not_implemented": 1.0}
        else:
            out = bench_rl(path, args, args.async_rollouts)
    except WorkloadError as e:
        print(f"[bench.rl_step] refused: {e}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"refused": str(e)}))
        sys.exit(3)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
