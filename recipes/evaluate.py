"""Evaluate any model of any shipped config on its held-out prompts:

    python -m recipes.evaluate --config recipes/configs/rlvr.yaml [--model start|PATH ...] [--samples k] [key=value ...]

--model: `start` (the config's starting policy, the default), a Hugging Face folder (a run's
`final/` or `best-by-judge/` export), a run folder (its `final/`), or an RL checkpoint folder
(`.../checkpoints/step_00000010`: verified against its manifest, then its DeepSpeed policy
state is exported). Give several to
compare them: the paired difference per prompt of each score, with its standard error, is printed.

Each model answers the config's held-out prompts (data.eval_source or the part held out of
data.source; --num-prompts caps them) greedily and, with --samples k > 0 (default
rollout.eval_samples), k times at the config's temperature with a fixed seed. Every answer is
scored by the config's rewards (functions and reward model: the training reward), the judges
(eval.judges, or --judges; default exact_match for tasks with answers, lexicon_sentiment and
on_topic for imdb) and text health; pass@k for 0/1 scores. Printed: a summary per model and mode;
written to --out (default runs/eval/<run_name>): samples-<model>.jsonl (every prompt, answer and
score), summary.json, and TensorBoard text (a few samples) when TensorBoard is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from rlhf.config import ConfigError, RunConfig, load_config
from rlhf.data.sources import DataError, load_prompts
from rlhf.episodes import episode_metrics
from rlhf.evaluation.judges import JUDGES, build_judges
from rlhf.evaluation.scoring import ScoredPass, judge_pass, pass_metrics, sample_records, samples_markdown, write_jsonl
from rlhf.evaluation.stats import paired_difference
from rlhf.experience import format_prompt, sampling_settings
from rlhf.models import check_model_paths, resolve_model_path

log = logging.getLogger("raylhf.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/rlvr.yaml", help="a recipe's YAML config")
    parser.add_argument("--model", action="append", help="start | a HF folder | a run folder | a checkpoint folder")
    parser.add_argument("--samples", type=int, default=None, help="sampled answers per prompt (0: greedy only)")
    parser.add_argument("--num-prompts", type=int, default=None, help="evaluate the first N held-out prompts")
    parser.add_argument(
        "--judges", default=None, help=f"comma-separated, from {', '.join(JUDGES)}; 'none' for no judge"
    )
    parser.add_argument(
        "--split",
        choices=("eval", "train"),
        default="eval",
        help="held-out prompts (the default), or the train prompts (e.g. to sample preference pairs from)",
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/eval/<run_name>)")
    parser.add_argument("--show", type=int, default=3, help="examples to print per model")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.eval_size=50")
    return parser.parse_args(argv)


def default_judges(cfg: RunConfig, prompts: list[dict]) -> list[str]:
    if cfg.eval.judges:
        return list(cfg.eval.judges)
    if any(p.get("answer") is not None for p in prompts):
        return ["exact_match"]
    if cfg.data.source == "imdb":
        try:
            import vaderSentiment  # noqa: F401
        except ImportError:
            log.warning("judge lexicon_sentiment skipped: pip install vaderSentiment==3.3.2")
            return ["on_topic"]
        return ["lexicon_sentiment", "on_topic"]
    return []


def resolve_model(cfg: RunConfig, model: str) -> tuple[str, str]:
    """(label, Hugging Face folder) for a --model value."""
    if model == "start":
        return "start", resolve_model_path(cfg.models.policy.path)
    path = Path(model)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(path).strip("/"))[-80:]
    if (path / "config.json").is_file():
        return label, str(path)
    if (path / "final" / "config.json").is_file():
        return label, str(path / "final")
    if (path / "policy").is_dir():
        from actors.evaluator import export_checkpoint
        from rlhf.checkpoint import CheckpointError, read_manifest, verify_files

        try:  # DeepSpeed's state is pickled: load only a checkpoint whose files match its manifest
            verify_files(path, read_manifest(path))
        except CheckpointError as e:
            raise ConfigError(f"--model {model!r}: not a sound checkpoint: {e}") from None

        log.info("exporting the policy of checkpoint %s as a Hugging Face folder", path)
        return label, export_checkpoint(cfg, path)
    raise ConfigError(f"--model {model!r}: not 'start', a Hugging Face folder, a run folder or a checkpoint folder")


def evaluate_model(
    cfg: RunConfig, model_path: str, prompts: list[dict], samples_k: int, judges: dict
) -> tuple[list[ScoredPass], dict[str, float]]:
    from actors.evaluator import ModelScorer

    r = cfg.rollout
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.policy.tokenizer or model_path)
    texts = [format_prompt(tokenizer, p["prompt"], cfg.data.chat_template) for p in prompts]
    if cfg.environment is not None:  # episodes start from the data rows (the environment's reset)
        texts = prompts
    modes = {"greedy": sampling_settings(r, "greedy")}
    if samples_k:
        modes["sampled"] = sampling_settings(r, "eval_sampled", n=samples_k)
    scorer = ModelScorer(cfg, model_path)
    passes, metrics = [], {}
    try:
        for mode, sampling in modes.items():
            started = time.perf_counter()
            samples = scorer.generate(texts, sampling)
            seconds = time.perf_counter() - started
            values, total, errors = scorer.score(prompts, samples)
            scored = judge_pass(judges, mode, prompts, samples, values, total)
            prefix = "" if mode == "greedy" else "sampled/"
            metrics |= {f"{prefix}reward/{k}": sum(v) / len(v) for k, v in values.items()}
            metrics |= {f"{prefix}reward_errors/{k}": float(v) for k, v in errors.items()}
            # answers a verifier gave partial credit (reasoning_gym: the gold number inside a wrong one)
            metrics |= {
                f"{prefix}partial_credit/{k}": float(sum(0 < x < 1 for x in v))
                for k, v in values.items()
                if k != "model" and all(0 <= x <= 1 for x in v)
            }
            if values:  # a config without rewards (SFT, DPO without a reward model) has no training reward
                metrics[f"{prefix}reward_mean"] = sum(total) / len(total)
            metrics[f"{prefix}finished_by_length"] = float(sum(s.get("finish_reason") == "length" for s in samples))
            metrics[f"{prefix}seconds"] = seconds  # the first pass includes the engine's warm-up
            metrics |= pass_metrics(scored, len(prompts), prefix)
            if cfg.environment is not None:  # turns, errors, timeouts, the environment's figures (tool calls)
                metrics |= episode_metrics(samples, prefix + "episodes/")
            passes.append(scored)
    finally:
        scorer.shutdown()
    return passes, metrics


def format_summary(metrics: dict[str, float]) -> str:
    return "\n".join(f"  {k:40s} {v:.4g}" for k, v in metrics.items())


def comparisons(first: ScoredPass, other: ScoredPass, n: int, prefix: str = "") -> dict[str, str]:
    """Per-prompt paired differences (other - first) of the training reward and each judge, over one
    mode's passes (sampled: each prompt's mean over its k answers)."""
    out = {}
    if first.rewards:  # else there is no training reward to compare
        before, after = first.per_prompt(first.total, n), other.per_prompt(other.total, n)
        out[f"{prefix}reward"] = paired_difference(before, after).text()
    for name in sorted(first.judges.keys() & other.judges.keys()):
        before, after = first.per_prompt(first.judges[name], n), other.per_prompt(other.judges[name], n)
        if not any(math.isnan(x) for x in before + after):
            out[f"{prefix}judge/{name}"] = paired_difference(before, after).text()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.models.policy is None:
            raise ConfigError(f"{args.config} trains no policy (algorithm {cfg.algorithm.name!r}): nothing generates")
        check_model_paths(cfg.models)  # before Ray: a bad path names itself (models.reward is used for scoring)
        prompts = load_prompts(cfg.data, args.split, cfg.rewards)
        if not prompts:
            raise ConfigError("no held-out prompts: set data.eval_size > 0 or data.eval_source")
        prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
        if args.judges == "none":
            names = []
        else:
            names = args.judges.split(",") if args.judges else default_judges(cfg, prompts)
        judges = build_judges([n for n in names if n], cfg.eval.on_topic_field)
    except (ConfigError, DataError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    samples_k = cfg.rollout.eval_samples if args.samples is None else args.samples
    out_dir = Path(args.out or Path(cfg.logging.dir) / "eval" / cfg.logging.run_name)
    out_dir.mkdir(parents=True, exist_ok=True)

    from actors.local_cluster import init_ray

    init_ray()  # joins RAY_ADDRESS's cluster, or starts a private local one
    writer = _tensorboard(out_dir)
    summary: dict[str, Any] = {
        "config": args.config,
        "split": args.split,
        "prompts": len(prompts),
        "judges": list(judges),
        "models": {},
    }
    passes_of: dict[str, dict[str, ScoredPass]] = {}  # label -> mode -> pass
    for model in args.model or ["start"]:
        label, path = resolve_model(cfg, model)
        log.info("evaluating %s (%s) on %d %s prompts of %s", label, path, len(prompts), args.split, cfg.data.source)
        passes, metrics = evaluate_model(cfg, path, prompts, samples_k, judges)
        records = [r for p in passes for r in sample_records(p, label)]
        write_jsonl(out_dir / f"samples-{label}.jsonl", records)
        if writer is not None:
            writer.add_text(f"samples/{label}", samples_markdown(records), 0)
        passes_of[label] = {p.mode: p for p in passes}
        for r in records[: args.show]:
            gold = f"answer {r['answer']}, " if "answer" in r else ""
            judged = ", ".join(f"{k} {v:.3g}" for k, v in r["judges"].items() if v is not None)
            print(f"Q: {r['prompt']!r}\nA: {r['completion'].strip()!r}  ({gold}reward {r['reward']:.3g}; {judged})\n")
        print(f"{label}: {path}\n{format_summary(metrics)}", flush=True)
        summary["models"][label] = {"path": path, "metrics": metrics}
    labels = list(passes_of)
    for label in labels[1:]:
        first, other = passes_of[labels[0]], passes_of[label]
        diff: dict[str, str] = {}
        for mode in [m for m in first if m in other]:  # greedy, then sampled (per-prompt means over k answers)
            diff |= comparisons(first[mode], other[mode], len(prompts), "" if mode == "greedy" else f"{mode}/")
        summary.setdefault("paired", {})[f"{label} - {labels[0]}"] = diff
        print(f"paired over {len(prompts)} prompts, {label} - {labels[0]}:")
        print("\n".join(f"  {k:32s} {v}" for k, v in diff.items()))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"samples and summary: {out_dir}")
    if writer is not None:
        writer.close()
    return summary


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
