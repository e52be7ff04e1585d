"""The benchmark suite: every benchmark on a fixed workload, one table.

    .venv/bin/python -m bench            # tiny model and SmolLM2-135M-Instruct (~20 min on 2 cores)
    .venv/bin/python -m bench --quick    # tiny model only (~6-10 min)
    .venv/bin/python -m bench --shared-prompt --models smollm2 --steps 3   # training forwards only (~12 min)

Each part runs in its own process (its own Ray, engines and memory), one after another:
bench.rl_step (the system's GRPO step, sync and with rollout.async_rollouts), bench.trl_grpo (TRL's
GRPOTrainer in bench/.trl-venv, which bench/setup_trl.sh creates on first use), bench.rollout_and_sync
and bench.micro_batching (`--shared-prompt` instead runs only the sync RL step three times: the
full-logits forward, response-only logits, and response-only logits with shared prompts). A part that fails is reported as such and the rest still run; its log
is kept. By default every process uses all cores' worth of threads (model actors through
RAYLHF_CPU_THREADS, as `make demo` does, since a step's phases take turns; the direct vLLM engine,
HF generate and TRL through OMP_NUM_THREADS); `--threads` sets one count for every side. While
the suite runs, CPU time used by processes outside it is counted and printed: numbers measured
on a busy machine are noisy, ratios measured side by side less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.monitor import Monitor
from bench.stats import PHASES, machine_description

ROOT = Path(__file__).resolve().parent.parent
TRL_PYTHON = ROOT / "bench" / ".trl-venv" / "bin" / "python"
# micro_batching's synthetic rows (long-tailed lengths): rows, padded rows per micro-batch, token budget, repeats
MICRO_BATCHING = {"tiny": ("32", "8", "1024", "3"), "smollm2": ("16", "4", "512", "1")}
STEPS = {"tiny": 8, "smollm2": 4}  # RL steps per run: tiny steps take seconds, so more of them


def run_part(name: str, cmd: list[str], logs: Path) -> dict | None:
    """Run one benchmark process; its JSON results, or None (and the log's tail) if it failed."""
    out, log = logs / f"{name}.json", logs / f"{name}.log"
    if out.exists():  # --logs of an earlier suite run: keep the parts that finished
        print(f"[bench] {name}: results of an earlier run, {out}", flush=True)
        return json.loads(out.read_text())
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with Monitor(interval_s=2.0, roles=False) as monitor, log.open("w") as f:
        code = subprocess.call(cmd + ["--json", str(out)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(
        f"[bench] {name}: {'ok' if code == 0 else f'FAILED (exit {code}), log {log}'} in {time.perf_counter() - start:.0f} s; "
        f"other processes used {monitor.others_cores:.2f} cores meanwhile",
        flush=True,
    )
    if code != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-15:]), flush=True)
        return None
    found = json.loads(out.read_text()) | {"others_cores": monitor.others_cores}
    out.write_text(json.dumps(found))
    return found


def bench_model(model: str, args, logs: Path) -> dict:
    py = sys.executable
    workload = ["--prompts", str(args.prompts), "--samples", str(args.samples), "--tokens", str(args.tokens)]
    rl = workload + ["--steps", str(args.steps or STEPS[model])]
    r: dict = {}
    r["sync"] = run_part(f"{model}-rl-sync", [py, "-m", "bench.rl_step", "--model", model] + rl, logs)
    r["async"] = run_part(
        f"{model}-rl-async", [py, "-m", "bench.rl_step", "--model", model, "--async-rollouts"] + rl, logs
    )
    if not args.skip_trl and subprocess.call(["bash", "bench/setup_trl.sh"], cwd=ROOT) == 0:
        from bench.rollout_and_sync import model_path

        r["trl"] = run_part(
            f"{model}-trl", [str(TRL_PYTHON), "-m", "bench.trl_grpo", "--model-path", model_path(model)] + rl, logs
        )
    found = run_part(
        f"{model}-rollout", [py, "-m", "bench.rollout_and_sync", "--model", model, "--repeats", "3"] + workload, logs
    )
    r["rollout"] = found[model] | {"others_cores": found["others_cores"]} if found else None
    rows, micro, budget, repeats = MICRO_BATCHING[model]
    found = run_part(
        f"{model}-packing",
        [
            py,
            "-m",
            "bench.micro_batching",
            "--model",
            model,
            "--rows",
            rows,
            "--micro-rows",
            micro,
            "--budget",
            budget,
            "--repeats",
            repeats,
        ],
        logs,
    )
    r["packing"] = found[model] | {"others_cores": found["others_cores"]} if found else None
    r["others_cores"] = [part["others_cores"] for part in r.values() if part and "others_cores" in part]
    return r


# --shared-prompt: the same sync RL run three ways, one after another (bench.rl_step flags)
FORWARDS = {  # part name: (label, flags)
    "full-logits": ("full logits, one row per sample (the old forward)", ["--shared-prompt", "off", "--full-logits"]),
    "response-only": ("response-only logits (trainer.shared_prompt=off)", ["--shared-prompt", "off"]),
    "shared-prompt": (
        "response-only logits + shared prompt (shared_prompt=auto, the default)",
        ["--shared-prompt", "auto"],
    ),
}


def bench_forwards(model: str, args, logs: Path) -> dict:
    py = sys.executable
    rl = ["--prompts", str(args.prompts), "--samples", str(args.samples), "--tokens", str(args.tokens)]
    rl += ["--steps", str(args.steps or STEPS[model])]
    return {
        label: run_part(f"{model}-rl-{name}", [py, "-m", "bench.rl_step", "--model", model, *rl, *flags], logs)
        for name, (label, flags) in FORWARDS.items()
    }


def forwards_table(results: dict[str, dict]) -> list[str]:
    """Markdown lines: per model, each forward's step, train and reference medians, speed-ups over
    the first (the old forward), samples/s and the policy's and reference's peak memory."""
    lines = [
        "| model | forward | step, s | train, s | reference, s | step / train / reference speed-up "
        "| samples/s | tokens not run | peak RSS policy / reference, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        base = next(iter(runs.values()))
        for label, r in runs.items():
            if r is None or base is None:
                lines.append(f"| {model} | {label} | failed |" + " |" * 6)
                continue
            speed = " / ".join(f"{base['time/' + k] / r['time/' + k]:.2f}x" for k in ("step", "train", "reference"))
            lines.append(
                f"| {model} | {label} | {r['time/step']:.2f} | {r['time/train']:.2f} | {r['time/reference']:.2f} | "
                f"{speed} | {r['samples_per_s']:.2f} | {r.get('shared_prompt/tokens_skipped', 0.0):.0%} | "
                f"{r['peak_rss_mib/policy']:.0f} / {r['peak_rss_mib/reference']:.0f} |"
            )
    return lines


def table(results: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) rows of the summary table."""

    def cell(fn):
        def one(r):
            try:
                return fn(r)
            except (KeyError, TypeError, ZeroDivisionError):  # a failed part (None) or a missing figure
                return "failed" if any(v is None for v in r.values()) else "n/a"

        return [one(r) for r in results.values()]

    def async_cell(fn):
        return lambda r: "n/a (not implemented)" if r["async"].get("not_implemented") else fn(r)

    s = lambda r: r["sync"]
    rows = [
        (
            "first step (warm-up: engine and kernel start-up; left out), s",
            cell(lambda r: f"{s(r)['step_walls'][0]:.0f}"),
        ),
        ("**step time (sync), s**", cell(lambda r: f"{s(r)['time/step']:.2f}")),
    ]
    for p in PHASES + ("other",):
        rows.append(
            (
                f"- {p}, s (share)",
                cell(lambda r, p=p: f"{s(r)['time/' + p]:.2f} ({s(r)['time/' + p] / s(r)['time/step']:.0%})"),
            )
        )
    rows += [
        (
            "**other (orchestration) share of the step** (median of steps; target <= 10%)",
            cell(lambda r: f"{s(r)['time/other_share']:.1%}"),
        ),
        ("step time with rollout.async_rollouts=true, s", cell(async_cell(lambda r: f"{r['async']['time/step']:.2f}"))),
        (
            "async speed-up (sync step / async step)",
            cell(async_cell(lambda r: f"{s(r)['time/step'] / r['async']['time/step']:.2f}x")),
        ),
        ("samples/s: raylhf sync", cell(lambda r: f"{s(r)['samples_per_s']:.2f}")),
        ("samples/s: raylhf async", cell(async_cell(lambda r: f"{r['async']['samples_per_s']:.2f}"))),
        ("samples/s: TRL GRPOTrainer (HF generate)", cell(lambda r: f"{r['trl']['samples_per_s']:.2f}")),
        (
            "**raylhf / TRL samples/s** (sync; target >= 1.5x)",
            cell(lambda r: f"{s(r)['samples_per_s'] / r['trl']['samples_per_s']:.2f}x"),
        ),
        (
            "raylhf async / TRL samples/s",
            cell(async_cell(lambda r: f"{r['async']['samples_per_s'] / r['trl']['samples_per_s']:.2f}x")),
        ),
        (
            "generated tokens per step: raylhf / TRL",
            cell(lambda r: f"{s(r)['generated_tokens_per_step']:.0f} / {r['trl']['generated_tokens_per_step']:.0f}"),
        ),
        (
            "rollout tokens/s: through the RolloutGroup (Ray actor)",
            cell(lambda r: f"{r['rollout']['group_tokens_per_s']:.0f}"),
        ),
        (
            "rollout tokens/s: the same vLLM engine called directly",
            cell(lambda r: f"{r['rollout']['direct_tokens_per_s']:.0f}"),
        ),
        ("**RolloutGroup / direct vLLM** (target >= 0.9)", cell(lambda r: f"{r['rollout']['group_vs_direct']:.2f}")),
        (
            "rollout tokens/s: HF generate (every sample counted at full length: an upper bound)",
            cell(lambda r: f"{r['rollout']['hf_tokens_per_s']:.0f}"),
        ),
        (
            "weight sync, s (GB/s): torch.save bytes -> FlatWeights (target >= 2 GB/s)",
            cell(
                lambda r: (
                    f"{r['rollout']['sync_seconds_before']:.2f} ({r['rollout']['sync_GB_per_s_before']:.2f}) -> "
                    f"{r['rollout']['sync_seconds']:.2f} ({r['rollout']['sync_GB_per_s']:.2f})"
                )
            ),
        ),
        (
            "training tokens/s: fixed rows -> token budget (packed)",
            cell(lambda r: f"{r['packing']['padded: tokens/s']:.0f} -> {r['packing']['packed: tokens/s']:.0f}"),
        ),
        (
            "**packed / padded training tokens/s**",
            cell(lambda r: f"{r['packing']['speed-up (packed / padded tokens/s)']:.2f}x"),
        ),
    ]
    for role in ("policy", "reference", "rollout", "driver"):
        rows.append(
            (f"peak RSS, {role} process, MiB", cell(lambda r, role=role: f"{s(r)['peak_rss_mib/' + role]:.0f}"))
        )
    rows.append(
        (
            "peak RSS, TRL (one process: policy + reference + generation), MiB",
            cell(lambda r: f"{r['trl']['peak_rss_mib']:.0f}"),
        )
    )
    rows.append(
        (
            "CPU cores used by other processes meanwhile (mean, max over parts)",
            cell(lambda r: f"{sum(r['others_cores']) / len(r['others_cores']):.2f}, {max(r['others_cores']):.2f}"),
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per sample")
    parser.add_argument("--steps", type=int, help=f"RL steps per run, medians leave out the first (default {STEPS})")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch/OpenMP threads per process, every side (default: all cores; 1 on a shared machine)",
    )
    parser.add_argument(
        "--logs",
        help="folder for logs and per-part results; one of an earlier run: only the "
        "parts without results run again (e.g. after one failed)",
    )
    parser.add_argument("--skip-trl", action="store_true", help="no TRL comparison (no bench/.trl-venv)")
    parser.add_argument(
        "--shared-prompt",
        action="store_true",
        help="only the training-forward comparison: the sync RL step with full logits, response-only "
        "logits, and response-only logits + shared prompts (the default), side by side",
    )
    args = parser.parse_args()
    models = ["tiny"] if args.quick else args.models.split(",")
    # One thread count for every side: the system's actors (RAYLHF_CPU_THREADS), and through
    # OMP_NUM_THREADS the direct vLLM engine, HF generate and TRL. OpenMP threads that outnumber
    # the free cores wait on each other at every barrier: on this 2-core machine with another
    # job using one core, HF generate ran 20x slower with 2 threads than with 1.
    os.environ["RAYLHF_CPU_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="raylhf-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench] logs in {logs}", flush=True)
    started = time.perf_counter()
    if args.shared_prompt:
        found = {m: bench_forwards(m, args, logs) for m in models}
        print(
            f"\nmachine: {machine_description()}; fp32; {args.threads} thread(s) per process; "
            f"suite wall time {(time.perf_counter() - started) / 60:.1f} min; sync GRPO step, {args.prompts} "
            f"prompts x {args.samples} samples x <= {args.tokens} new tokens, medians of the steps after the first\n"
        )
        print("\n".join(forwards_table(found)))
        return
    results = {m: bench_model(m, args, logs) for m in models}

    names = {"tiny": "tiny (4-layer Qwen2, 0.6M)", "smollm2": "SmolLM2-135M-Instruct"}
    print(
        f"\nmachine: {machine_description()}; fp32; {args.threads} thread(s) per process; "
        f"suite wall time {(time.perf_counter() - started) / 60:.1f} min"
    )
    print(
        f"RL workload: GRPO on reasoning-gym chain_sum, {args.prompts} prompts x {args.samples} samples x "
        f"<= {args.tokens} new tokens per step ({args.prompts * args.samples} samples, one optimizer step in "
        f"micro-batches of 8), KL coef 0.04 to a frozen reference; "
        + ", ".join(f"{m}: {args.steps or STEPS[m]} steps" for m in models)
        + ", medians of the steps after the first. "
        "Rollout: the same prompts x samples x tokens, median of 3. Packing: synthetic long-tailed rows "
        + ", ".join(
            f"{m}: {MICRO_BATCHING[m][0]} rows, {MICRO_BATCHING[m][1]} rows vs {MICRO_BATCHING[m][2]} tokens"
            for m in models
        )
        + ".\n"
    )
    print("| metric | " + " | ".join(names[m] for m in models) + " |\n|---|" + "---|" * len(models))
    for label, cells in table(results):
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
