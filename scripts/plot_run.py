"""Plot a run's metrics.jsonl: training metrics per step (left axis) and held-out ones (right).

    .venv/bin/python scripts/plot_run.py runs/<run_name> --train reward/mean --eval eval/reward_mean -o run.png

Training metrics are logged every step; held-out metrics at step 0 (before training), at every
`trainer.eval_every` steps, and after the last step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--train", nargs="+", default=["reward/mean"], help="per-step metrics (left axis)")
    parser.add_argument("--eval", nargs="*", default=[], help="held-out metrics (right axis)")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG (default <run_dir>/metrics.png)")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, left = plt.subplots(figsize=(7, 4))
    for key in args.train:
        left.plot(*series(rows, key), label=key, alpha=0.8)
    left.set_xlabel("step")
    left.set_ylabel(", ".join(args.train))
    handles = left.get_legend_handles_labels()
    if args.eval:
        right = left.twinx()
        for key, color in zip(args.eval, ("black", "tab:red", "tab:green")):
            right.plot(*series(rows, key), "o--", color=color, label=f"{key} (held-out)")
        right.set_ylabel(", ".join(args.eval))
        extra = right.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    left.legend(*handles, loc="upper left", fontsize=8)
    left.set_title(args.title or args.run_dir.name)
    fig.tight_layout()
    output = args.output or args.run_dir / "metrics.png"
    fig.savefig(output, dpi=110)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
