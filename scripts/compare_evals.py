"""Before/after of a run, or of any two evaluations, from their sample files: the training reward
and every judge, per mode (greedy, sampled), with the paired difference over the same prompts.

    python scripts/compare_evals.py runs/<run>                    # the run's first vs last samples/eval-*.jsonl
    python scripts/compare_evals.py BEFORE.jsonl AFTER.jsonl      # any two samples files (run or recipes.evaluate)
    python scripts/compare_evals.py docs/samples/<run>            # the recorded runs' samples (eval-*.jsonl.gz)

Prints one line per mode and score: before -> after, after - before ± its standard error, t,
and how many prompts went up / down. --per-sample pairs sample j of each prompt before and after
(fixed-seed sampling) instead of per-prompt means: for a few prompts with many samples each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.evaluation.compare import compare_records, means, read_records


def sample_files(args: list[str]) -> tuple[Path, Path]:
    if len(args) == 1:
        run = Path(args[0])
        folder = run / "samples" if (run / "samples").is_dir() else run  # a run, or a folder of eval files
        evals = sorted(folder.glob("eval-*.jsonl*"))  # .jsonl, or .jsonl.gz in docs/samples
        if len(evals) < 2:
            raise ValueError(f"{folder}: need at least two eval-*.jsonl files, found {len(evals)}")
        return evals[0], evals[-1]
    if len(args) == 2:
        return Path(args[0]), Path(args[1])
    raise ValueError("give a run folder, or two samples files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="a run folder, or BEFORE.jsonl AFTER.jsonl")
    parser.add_argument("--per-sample", action="store_true", help="pair sample j of each prompt, not prompt means")
    args = parser.parse_args(argv)
    try:
        before_file, after_file = sample_files(args.paths)
        before, after = read_records(before_file), read_records(after_file)
        diffs = compare_records(before, after, args.per_sample)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb, ma = means(before), means(after)
    print(f"before: {before_file}\nafter:  {after_file}")
    for mode, scores in diffs.items():
        for name, paired in scores.items():
            print(f"  {mode:8s} {name:26s} {mb[mode][name]:.3f} -> {ma[mode][name]:.3f}  {paired.text()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
