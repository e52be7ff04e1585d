"""The benchmark suite: every benchmark on one workload, one table, issue 16's targets as met / not met.

    .venv/bin/python -m bench                          # tiny model and SmolLM2-135M-Instruct (~20 min on 2 cores)
    .venv/bin/python -m bench --quick                  # tiny model only (~6-10 min)
    .venv/bin/python -m bench --preset large           # 16 prompts x 8 samples x <= 128 new tokens
    .venv/bin/python -m bench --quick --prompts 6 --samples 6 --max-new-tokens 48 --parts rl-sync,trl
    .venv/bin/python -m bench --grad-checkpointing both   # every RL and TRL part with and without it
    .venv/bin/python -m bench --dtype bf16 --lora --parts rl-sync,trl   # both sides in bf16, training LoRA adapters
    .venv/bin/python -m bench --shared-prompt --models smollm2 --steps 3   # training forwards only (~12 min)

Each part runs in its own process (its own Ray, engines and memory), one after another:
bench.rl_step (the system's GRPO step, sync and with rollout.async_rollouts), bench.trl_grpo (TRL's
GRPOTrainer in bench/.trl-venv, which bench/setup_trl.sh creates on first use), bench.rollout_and_sync
and bench.micro_batching (`--shared-prompt` instead runs only the sync RL step three times: the
full-logits forward, response-only logits, and response-only logits with shared prompts, on the
same workload and settings). A part that fails is reported as such and the rest still run; its log
is kept. A part that cannot honour the size or a setting refuses (exit 3, "refused" in the
table) rather than running something else; sizes are checked for both sides before anything runs.
Any size runs: micro-batches are derived from it (bench.workload.micro_batch_rows), the same on
both sides, and samples/s counts the samples each side's own record says it trained.
Threads are explicit: `--threads` (default: all cores) goes to every part, as a flag to the RL and
TRL parts and through RAYLHF_CPU_THREADS / OMP_NUM_THREADS to all; a part run alone does the same
(bench/__init__.py). While the suite runs, CPU time used by processes outside it is counted and
printed: numbers measured on a busy machine are noisy, ratios measured side by side less so.
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
from bench.rl_step import KL_COEF, LR
from bench.stats import PHASES, machine_description
from bench.threads import use_threads
from bench.workload import (
    PRESETS,
    Workload,
    WorkloadError,
    micro_batch_rows,
    settings_header,
    settings_rows,
    side_settings,
    target_line,
    validate,
)

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
    seconds = time.perf_counter() - start
    if code == 3 and out.exists():  # the part refused a size or setting it cannot honour
        refused = json.loads(out.read_text())
        print(f"[bench] {name}: refused in {seconds:.0f} s: {refused.get('refused')}", flush=True)
        return refused
    print(
        f"[bench] {name}: {'ok' if code == 0 else f'FAILED (exit {code}), log {log}'} in {seconds:.0f} s; "
        f"other processes used {monitor.others_cores:.2f} cores meanwhile",
        flush=True,
    )
    if code != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-15:]), flush=True)
        return None
    found = json.loads(out.read_text()) | {"others_cores": monitor.others_cores}
    out.write_text(json.dumps(found))
    return found


NOT_RUN = {"not_run": 1.0}  # a part left out by --parts
PARTS = ("rl-sync", "rl-async", "trl", "rollout", "packing")


def grad_checkpointing_values(setting: str) -> list[str]:
    return ["off", "on"] if setting == "both" else [setting]


def bench_model(model: str, args, w: Workload, logs: Path) -> dict:
    """Every selected part for one model: {"sync"|"async"|"trl": {gc: results}, "rollout", "packing"}."""
    py = sys.executable
    workload = ["--prompts", str(w.prompts), "--samples", str(w.samples), "--tokens", str(w.max_new_tokens)]
    rl = workload + ["--steps", str(args.steps or STEPS[model]), "--threads", str(args.threads), "--dtype", args.dtype]
    rl += ["--lora"] if args.lora else []
    variant = ("-bf16" if args.dtype == "bf16" else "") + ("-lora" if args.lora else "")  # --logs keeps each apart
    r: dict = {"sync": {}, "async": {}, "trl": {}, "rollout": NOT_RUN, "packing": NOT_RUN}
    for gc in grad_checkpointing_values(args.grad_checkpointing):
        both = rl + ["--grad-checkpointing", gc]
        if "rl-sync" in args.parts:
            r["sync"][gc] = run_part(
                f"{model}-rl-sync-gc-{gc}{variant}", [py, "-m", "bench.rl_step", "--model", model] + both, logs
            )
        if "rl-async" in args.parts:
            r["async"][gc] = run_part(
                f"{model}-rl-async-gc-{gc}{variant}",
                [py, "-m", "bench.rl_step", "--model", model, "--async-rollouts"] + both,
                logs,
            )
        if "trl" in args.parts and not args.skip_trl and trl_venv_ready():
            from bench.rollout_and_sync import model_path

            r["trl"][gc] = run_part(
                f"{model}-trl-gc-{gc}{variant}",
                [str(TRL_PYTHON), "-m", "bench.trl_grpo", "--model-path", model_path(model)] + both,
                logs,
            )
    if "rollout" in args.parts:
        found = run_part(
            f"{model}-rollout",
            [py, "-m", "bench.rollout_and_sync", "--model", model, "--repeats", "3"] + workload,
            logs,
        )
        r["rollout"] = found[model] | {"others_cores": found["others_cores"]} if found else None
    if "packing" in args.parts:
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
    parts = [p for k in ("sync", "async", "trl") for p in r[k].values()] + [r["rollout"], r["packing"]]
    r["others_cores"] = [p["others_cores"] for p in parts if p and "others_cores" in p]
    return r


_trl_ready: bool | None = None


def trl_venv_ready() -> bool:
    """bench/setup_trl.sh once per suite run (it returns at once if the venv is up to date)."""
    global _trl_ready
    if _trl_ready is None:
        _trl_ready = subprocess.call(["bash", "bench/setup_trl.sh"], cwd=ROOT) == 0
    return _trl_ready


class Missing(Exception):
    """A figure whose part did not produce it; the message is the cell's text."""


def ran(part: dict | None) -> dict:
    if part is None:
        raise Missing("failed")
    if part.get("not_run"):
        raise Missing("not run")
    if "refused" in part:
        raise Missing("refused")
    if part.get("not_implemented"):
        raise Missing("n/a (not implemented)")
    return part


def pick(r: dict, kind: str, gc: str) -> dict:
    """The results of part `kind` (sync, async, trl) run with gradient checkpointing `gc`."""
    if gc not in r[kind]:
        raise Missing("not run")
    return ran(r[kind][gc])


def base_gc(r: dict) -> str:
    """The checkpointing value of the sync run the step breakdown shows: off if it ran."""
    return next((gc for gc in ("off", "on") if r["sync"].get(gc) and "refused" not in r["sync"][gc]), "off")


def our_peak_mib(part: dict) -> float:
    """Peak RSS of all our processes together: the sum of each role's peak (an upper bound of
    the peak of the sum, since the roles need not peak at the same moment)."""
    return sum(v for k, v in part.items() if k.startswith("peak_rss_mib/"))


def cell(results: dict[str, dict], fn) -> list[str]:
    def one(r):
        try:
            return fn(r)
        except Missing as e:
            return str(e)
        except (KeyError, TypeError, ZeroDivisionError):  # a missing figure
            return "n/a"

    return [one(r) for r in results.values()]


def gc_rows(results: dict[str, dict], gc: str) -> list[tuple[str, list[str]]]:
    """The rows that depend on the gradient-checkpointing setting: samples/s, counts, memory."""
    g = f" (grad checkpointing {gc})"
    sync = lambda r: pick(r, "sync", gc)
    asyn = lambda r: pick(r, "async", gc)
    trl = lambda r: pick(r, "trl", gc)
    return [
        ("step time with rollout.async_rollouts=true, s" + g, cell(results, lambda r: f"{asyn(r)['time/step']:.2f}")),
        ("samples/s: raylhf sync" + g, cell(results, lambda r: f"{sync(r)['samples_per_s']:.2f}")),
        ("samples/s: raylhf async" + g, cell(results, lambda r: f"{asyn(r)['samples_per_s']:.2f}")),
        ("samples/s: TRL GRPOTrainer (HF generate)" + g, cell(results, lambda r: f"{trl(r)['samples_per_s']:.2f}")),
        (
            "**raylhf sync / TRL samples/s**" + g,
            cell(results, lambda r: f"{sync(r)['samples_per_s'] / trl(r)['samples_per_s']:.2f}x"),
        ),
        (
            "raylhf async / TRL samples/s" + g,
            cell(results, lambda r: f"{asyn(r)['samples_per_s'] / trl(r)['samples_per_s']:.2f}x"),
        ),
        (
            "samples trained per step, each side's own record: raylhf / TRL" + g,
            cell(
                results,
                lambda r: (
                    f"{_counts(sync(r)['trained_samples_per_step'])} / {_counts(trl(r)['trained_samples_per_step'])}"
                ),
            ),
        ),
        (
            "tokens generated per step (mean): raylhf / TRL" + g,
            cell(
                results,
                lambda r: f"{sync(r)['generated_tokens_per_step']:.0f} / {trl(r)['generated_tokens_per_step']:.0f}",
            ),
        ),
        (
            "peak RSS, all our processes (sum of per-role peaks, sync), MiB" + g,
            cell(results, lambda r: f"{our_peak_mib(sync(r)):.0f}"),
        ),
        (
            "peak RSS, TRL (one process: policy + reference + generation), MiB" + g,
            cell(results, lambda r: f"{trl(r)['peak_rss_mib']:.0f}"),
        ),
    ]


# --shared-prompt: the same sync RL run three ways, one after another (bench.rl_step flags)
FORWARDS = {  # part name: (label, flags)
    "full-logits": ("full logits, one row per sample (the old forward)", ["--shared-prompt", "off", "--full-logits"]),
    "response-only": ("response-only logits (trainer.shared_prompt=off)", ["--shared-prompt", "off"]),
    "shared-prompt": (
        "response-only logits + shared prompt (shared_prompt=auto, the default)",
        ["--shared-prompt", "auto"],
    ),
}


def bench_forwards(model: str, args, w: Workload, logs: Path) -> dict[str, dict[str, dict | None]]:
    """{gc: {label: results}}: the three forwards of FORWARDS on workload `w`, for each
    --grad-checkpointing value; bench.rl_step derives the micro-batches from the size, as in the suite."""
    py = sys.executable
    rl = ["--prompts", str(w.prompts), "--samples", str(w.samples), "--tokens", str(w.max_new_tokens)]
    rl += ["--steps", str(args.steps or STEPS[model]), "--threads", str(args.threads)]
    return {
        gc: {
            label: run_part(
                f"{model}-rl-{name}-gc-{gc}",
                [py, "-m", "bench.rl_step", "--model", model, *rl, "--grad-checkpointing", gc, *flags],
                logs,
            )
            for name, (label, flags) in FORWARDS.items()
        }
        for gc in grad_checkpointing_values(args.grad_checkpointing)
    }


def forwards_table(results: dict[str, dict[str, dict[str, dict | None]]]) -> list[str]:
    """Markdown lines: per model and checkpointing value, each forward's step, train and reference
    medians, speed-ups over the first (the old forward), samples/s and the policy's and reference's
    peak memory. A run that failed, refused or was not run says so in its row."""
    lines = [
        "| model | grad ckpt | forward | step, s | train, s | reference, s | step / train / reference speed-up "
        "| samples/s | tokens not run | peak RSS policy / reference, MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_gc in results.items():
        for gc, runs in by_gc.items():
            base = next(iter(runs.values()))
            for label, found in runs.items():
                try:
                    r = ran(found)
                except Missing as e:
                    lines.append(f"| {model} | {gc} | {label} | {e} |" + " |" * 6)
                    continue
                try:
                    b = ran(base)
                    speed = " / ".join(
                        f"{b['time/' + k] / r['time/' + k]:.2f}x" for k in ("step", "train", "reference")
                    )
                except Missing:
                    speed = "n/a (no base run)"
                lines.append(
                    f"| {model} | {gc} | {label} | {r['time/step']:.2f} | {r['time/train']:.2f} | "
                    f"{r['time/reference']:.2f} | {speed} | {r['samples_per_s']:.2f} | "
                    f"{r.get('shared_prompt/tokens_skipped', 0.0):.0%} | "
                    f"{r['peak_rss_mib/policy']:.0f} / {r['peak_rss_mib/reference']:.0f} |"
                )
    return lines


def table(results: dict[str, dict], gcs: list[str]) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) rows of the summary table."""
    s = lambda r: pick(r, "sync", base_gc(r))
    rows = [
        (
            "first step (warm-up: engine and kernel start-up; left out), s",
            cell(results, lambda r: f"{s(r)['step_walls'][0]:.0f}"),
        ),
        ("**step time (sync), s**", cell(results, lambda r: f"{s(r)['time/step']:.2f}")),
    ]
    for p in PHASES + ("other",):
        rows.append(
            (
                f"- {p}, s (share)",
                cell(results, lambda r, p=p: f"{s(r)['time/' + p]:.2f} ({s(r)['time/' + p] / s(r)['time/step']:.0%})"),
            )
        )
    rows.append(
        (
            "**other (orchestration) share of the step** (median of steps; target <= 10%)",
            cell(results, lambda r: f"{s(r)['time/other_share']:.1%}"),
        )
    )
    for gc in gcs:
        rows += gc_rows(results, gc)
    rollout = lambda r: ran(r["rollout"])
    packing = lambda r: ran(r["packing"])
    rows += [
        (
            "rollout tokens/s: through the RolloutGroup (Ray actor)",
            cell(results, lambda r: f"{rollout(r)['group_tokens_per_s']:.0f}"),
        ),
        (
            "rollout tokens/s: the same vLLM engine called directly",
            cell(results, lambda r: f"{rollout(r)['direct_tokens_per_s']:.0f}"),
        ),
        (
            "**RolloutGroup / direct vLLM** (target >= 0.9)",
            cell(results, lambda r: f"{rollout(r)['group_vs_direct']:.2f}"),
        ),
        (
            "rollout tokens/s: HF generate (every sample counted at full length: an upper bound)",
            cell(results, lambda r: f"{rollout(r)['hf_tokens_per_s']:.0f}"),
        ),
        (
            "weight sync, s (GB/s): torch.save bytes -> FlatWeights (target >= 2 GB/s)",
            cell(
                results,
                lambda r: (
                    f"{rollout(r)['sync_seconds_before']:.2f} ({rollout(r)['sync_GB_per_s_before']:.2f}) -> "
                    f"{rollout(r)['sync_seconds']:.2f} ({rollout(r)['sync_GB_per_s']:.2f})"
                ),
            ),
        ),
        (
            "training tokens/s: fixed rows -> token budget (packed)",
            cell(results, lambda r: f"{packing(r)['padded: tokens/s']:.0f} -> {packing(r)['packed: tokens/s']:.0f}"),
        ),
        (
            "**packed / padded training tokens/s**",
            cell(results, lambda r: f"{packing(r)['speed-up (packed / padded tokens/s)']:.2f}x"),
        ),
    ]
    for role in ("policy", "reference", "rollout", "driver"):
        rows.append(
            (
                f"peak RSS, {role} process (sync), MiB",
                cell(results, lambda r, role=role: f"{s(r)['peak_rss_mib/' + role]:.0f}"),
            )
        )
    rows.append(
        (
            "CPU cores used by other processes meanwhile (mean, max over parts)",
            cell(
                results,
                lambda r: f"{sum(r['others_cores']) / len(r['others_cores']):.2f}, {max(r['others_cores']):.2f}",
            ),
        )
    )
    return rows


def _counts(trained: list[float]) -> str:
    return ", ".join(f"{n:g}" for n in sorted(set(trained)))


SAMPLES_TARGET = {"tiny": 3.0, "smollm2": 2.5}  # issue 16: >= 2.5x TRL on SmolLM2, >= 3x on the tiny model
MEMORY_TARGET, LORA_MEMORY_TARGET, SYNC_GBPS_TARGET = 2.0, 1.5, 2.0  # issue 16: <= 2x TRL's memory, LoRA <= 1.5x


def target_lines(model: str, r: dict, lora: bool = False) -> list[str]:
    """Issue 16's targets as met / not met lines: best setting of each side against best."""

    def best(kinds: tuple[str, ...]) -> float | None:
        figures = [
            p["samples_per_s"]
            for k in kinds
            for p in r[k].values()
            if p and "samples_per_s" in p and "refused" not in p
        ]
        return max(figures) if figures else None

    ours, trl = best(("sync", "async")), best(("trl",))
    lines = [
        target_line(
            "samples/s, best of ours / best of TRL", ours / trl if ours and trl else None, SAMPLES_TARGET[model], True
        )
    ]
    memory_target = LORA_MEMORY_TARGET if lora else MEMORY_TARGET
    for gc in ("off", "on"):  # TRL without checkpointing, or both sides with it
        ours_mib = [our_peak_mib(p) for k in ("sync", "async") if (p := r[k].get(gc)) and "samples_per_s" in p]
        trl_run = r["trl"].get(gc)
        if ours_mib and trl_run and "peak_rss_mib" in trl_run:
            ratio = max(ours_mib) / trl_run["peak_rss_mib"]
            name = f"peak memory, all our processes / TRL (both with grad checkpointing {gc}{', LoRA' if lora else ''})"
            lines.append(target_line(name, ratio, memory_target, False))
            break
    else:
        lines.append(
            target_line("peak memory, all our processes / TRL (same checkpointing)", None, memory_target, False)
        )
    try:
        gbps = ran(r["rollout"])["sync_GB_per_s"]
    except (Missing, KeyError):
        gbps = None
    lines.append(target_line("weight sync", gbps, SYNC_GBPS_TARGET, True, unit=" GB/s"))
    return lines


def settings_of(r: dict, w: Workload, dtype: str = "fp32", lora: bool = False) -> list[tuple[str, str, str, bool]]:
    """Every setting of the two sides, fixed and recorded, for the table's header."""
    from bench.rl_step import LORA

    shared = {
        "workload": f"{w.describe()} per step ({w.batch} samples, one optimizer step)",
        "trained weights": (
            f"LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g}, every attention and MLP projection; "
            "reference = adapters off"
            if lora
            else "all (full fine-tuning)"
        ),
        "sampling": "temperature 1, no top-p / top-k",
        "optimizer": f"AdamW, lr {LR:g} constant, grad clip 1.0",
    }
    ours = shared | {
        "precision": "fp32" if dtype == "fp32" else "bf16 weights and compute, fp32 master weights (DeepSpeed bf16)",
        "processes": f"driver + policy, {'' if lora else 'reference and '}rollout actors (Ray)",
        "generation": "vLLM (CPU) in the rollout actor",
        "loss": f"token-mean; KL k3 as a loss term, coef {KL_COEF:g}",
        "training engine": f"DeepSpeed ZeRO-{recorded_zero_stage(r)}, 1 rank",
    }
    trl = shared | {
        "precision": "fp32" if dtype == "fp32" else "fp32 weights under bf16 autocast (Trainer bf16=True)",
        "processes": "one (policy, reference and generation)",
        "generation": "HF generate in the trainer's process",
        "loss": f"token-mean ('dapo'); KL k3 as a loss term, beta {KL_COEF:g}",
        "training engine": "HF Trainer (accelerate), 1 process",
    }
    return settings_rows(side_settings(ours, r["sync"]), side_settings(trl, r["trl"]))


def recorded_zero_stage(r: dict) -> str:
    """The ZeRO stage our sync runs recorded (trainer.zero_stage auto: 0 on one rank); '2' before they did."""
    stages = {f"{p['zero_stage']:g}" for p in r["sync"].values() if p and "zero_stage" in p}
    return "/".join(sorted(stages)) or "2"


def workload_from(args) -> Workload:
    """The preset, with any of --prompts / --samples / --max-new-tokens overriding its field."""
    w = PRESETS[args.preset]
    return Workload(
        args.prompts if args.prompts is not None else w.prompts,
        args.samples if args.samples is not None else w.samples,
        args.max_new_tokens if args.max_new_tokens is not None else w.max_new_tokens,
    )


def resolve_dtype(dtype: str) -> str:
    """The suite's --dtype: auto is what a run's `dtype: auto` picks here (rlhf.models.preferred_dtype),
    so the default compares both sides in the precision the system itself would train in."""
    if dtype != "auto":
        return dtype
    from rlhf.models import preferred_dtype

    return "bf16" if preferred_dtype() == "bfloat16" else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="today",
        help="workload: " + "; ".join(f"{k}: {w.describe()}" for k, w in PRESETS.items()),
    )
    parser.add_argument("--prompts", type=int, help="prompts per step (overrides the preset's)")
    parser.add_argument("--samples", type=int, help="samples per prompt (overrides the preset's)")
    parser.add_argument(
        "--max-new-tokens", "--tokens", dest="max_new_tokens", type=int, help="max new tokens per sample (overrides)"
    )
    parser.add_argument("--steps", type=int, help=f"RL steps per run, medians leave out the first (default {STEPS})")
    parser.add_argument(
        "--grad-checkpointing",
        choices=["off", "on", "both"],
        default="off",
        help="gradient checkpointing on both sides (TRL's own default is on; ours is trainer.gradient_checkpointing, "
        "off by default); both: every RL and TRL part twice",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch/OpenMP threads per process, every side (default: all cores; 1 on a shared machine)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default all: {','.join(PARTS)})"
    )
    parser.add_argument(
        "--logs",
        help="folder for logs and per-part results; one of an earlier run: only the "
        "parts without results run again (e.g. after one failed)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="precision of every RL and TRL part: bf16 = bf16 compute with fp32 master weights on both sides; "
        "auto (default): what `models.policy.dtype: auto` picks on this machine (bf16 on AMX CPUs, else fp32)",
    )
    parser.add_argument(
        "--lora", action="store_true", help="every RL and TRL part trains rank-16 LoRA adapters (peft on both sides)"
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
    args.parts = args.parts.split(",")
    unknown = sorted(set(args.parts) - set(PARTS)) + sorted(set(models) - set(STEPS))
    if unknown:
        parser.error(f"unknown part(s) or model(s) {unknown}: parts are {PARTS}, models {tuple(STEPS)}")
    w = workload_from(args)
    args.dtype = resolve_dtype(args.dtype)
    try:  # refuse a size either side cannot honour before anything starts
        from transformers import AutoConfig

        from bench.rollout_and_sync import model_path

        for m in models:
            validate(w, AutoConfig.from_pretrained(model_path(m)).max_position_embeddings, args.steps or STEPS[m])
    except WorkloadError as e:
        parser.error(str(e))
    # One thread count for every side, explicit: --threads to the parts that take it (bench.rl_step,
    # bench.trl_grpo), and for every process through RAYLHF_CPU_THREADS (the system's actors) and
    # OMP_NUM_THREADS (the direct vLLM engine, HF generate, TRL). OpenMP threads that outnumber
    # the free cores wait on each other at every barrier: on this 2-core machine with another
    # job using one core, HF generate ran 20x slower with 2 threads than with 1.
    use_threads(args.threads)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="raylhf-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench] logs in {logs}", flush=True)
    started = time.perf_counter()
    if args.shared_prompt:  # only the training-forward comparison (--parts does not apply)
        forwards = {m: bench_forwards(m, args, w, logs) for m in models}
        micro = micro_batch_rows(w.batch)
        print(
            f"\nmachine: {machine_description()}; fp32; {args.threads} thread(s) per process; "
            f"suite wall time {(time.perf_counter() - started) / 60:.1f} min; sync GRPO step, {w.describe()} "
            f"({w.batch} samples, one optimizer step in {w.batch // micro} micro-batches of {micro} rows), "
            + ", ".join(f"{m}: {args.steps or STEPS[m]} steps" for m in models)
            + ", medians of the steps after the first\n"
        )
        print("\n".join(forwards_table(forwards)))
        return
    results = {m: bench_model(m, args, w, logs) for m in models}
    gcs = grad_checkpointing_values(args.grad_checkpointing)

    names = {"tiny": "tiny (4-layer Qwen2, 0.6M)", "smollm2": "SmolLM2-135M-Instruct"}
    micro = micro_batch_rows(w.batch)
    print(
        f"\nmachine: {machine_description()}; {args.dtype}{', LoRA' if args.lora else ''}; "
        f"{args.threads} thread(s) per process; suite wall time {(time.perf_counter() - started) / 60:.1f} min"
    )
    print(
        f"RL workload: GRPO on reasoning-gym chain_sum, {w.describe()} per step ({w.batch} samples, one optimizer "
        f"step in {w.batch // micro} micro-batches of {micro} rows on both sides), KL coef {KL_COEF:g} to a frozen "
        "reference; "
        + ", ".join(f"{m}: {args.steps or STEPS[m]} steps" for m in models)
        + ", medians of the steps after the first. "
        "Rollout: the same prompts x samples x tokens, median of 3. Packing: synthetic long-tailed rows "
        + ", ".join(
            f"{m}: {MICRO_BATCHING[m][0]} rows, {MICRO_BATCHING[m][1]} rows vs {MICRO_BATCHING[m][2]} tokens"
            for m in models
        )
        + ".\n"
    )
    for m in models:
        print(f"{names[m]}: " + settings_header(settings_of(results[m], w, args.dtype, args.lora)) + "\n")
    print("| metric | " + " | ".join(names[m] for m in models) + " |\n|---|" + "---|" * len(models))
    for label, cells in table(results, gcs):
        print(f"| {label} | " + " | ".join(cells) + " |")
    for m in models:
        print(f"\nTargets (issue 16), {names[m]}, {w.describe()}:")
        print("\n".join(target_lines(m, results[m], args.lora)))


if __name__ == "__main__":
    main()
