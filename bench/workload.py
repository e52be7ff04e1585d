"""Pure rules of the benchmark's workload (no torch, no Ray; both venvs import it): the sizes,
the micro-batches derived from them, what each side can honour, how trained samples are
counted, and the table of settings. Unit-tested in tests/unit/test_bench_workload.py.

A comparison is only fair if both sides train the samples they are credited with. So every
size is checked before anything runs, micro-batches are derived from the size (never a fixed
count that may not divide it), and samples/s is computed from what each side's own record says
it trained, refusing a run whose record disagrees with the workload.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MICRO_BATCH_CAP = 8  # rows per forward/backward at most, on both sides
MAX_PROMPT_TOKENS = 128  # our side's data.max_prompt_len; chain_sum prompts in a chat template are shorter
TRAIN_PROMPTS = 256  # prompts in the training set (reasoning-gym chain_sum, seed 0), shared by both sides


class WorkloadError(ValueError):
    """A size or setting a side cannot honour; the message names the setting."""


@dataclass(frozen=True)
class Workload:
    prompts: int  # prompts per step
    samples: int  # samples per prompt
    max_new_tokens: int  # per sample

    @property
    def batch(self) -> int:
        """Samples per step: all of them are trained on, in one optimizer step."""
        return self.prompts * self.samples

    def describe(self) -> str:
        return f"{self.prompts} prompts x {self.samples} samples x <= {self.max_new_tokens} new tokens"


# today's workload, and the larger one of issue 16's targets
PRESETS = {"today": Workload(8, 4, 32), "large": Workload(16, 8, 128)}


def micro_batch_rows(batch: int, cap: int = MICRO_BATCH_CAP) -> int:
    """Rows per micro-batch: the largest divisor of `batch` that is <= cap, so the micro-batches
    of one optimizer step cover every sample exactly once (36 -> 6, 20 -> 5, 32 -> 8, 7 -> 7,
    11 -> 1). The same on both sides: TRL's generation batch is rows x accumulation steps, so a
    row count that does not divide the batch makes it generate and train fewer samples."""
    if batch < 1 or cap < 1:
        raise WorkloadError(f"batch ({batch}) and micro-batch cap ({cap}) must be >= 1")
    return max(d for d in range(1, min(cap, batch) + 1) if batch % d == 0)


def validate(w: Workload, max_positions: int | None = None, steps: int | None = None) -> None:
    """Raise WorkloadError naming the setting if either side cannot run `w` as asked.

    max_positions: the model's context length (config.max_position_embeddings), if known:
    the longest prompt plus max_new_tokens must fit. steps: RL steps of the run, if known."""
    if w.prompts < 1:
        raise WorkloadError(f"--prompts must be >= 1, got {w.prompts}")
    if w.samples < 2:
        raise WorkloadError(
            f"--samples must be >= 2, got {w.samples}: GRPO's advantage compares the samples of one prompt "
            "(our config and TRL's num_generations both refuse 1)"
        )
    if w.max_new_tokens < 1:
        raise WorkloadError(f"--max-new-tokens must be >= 1, got {w.max_new_tokens}")
    if w.prompts > TRAIN_PROMPTS:
        raise WorkloadError(f"--prompts {w.prompts} exceeds the {TRAIN_PROMPTS} prompts of the training set")
    if max_positions is not None and MAX_PROMPT_TOKENS + w.max_new_tokens > max_positions:
        raise WorkloadError(
            f"--max-new-tokens {w.max_new_tokens} + up to {MAX_PROMPT_TOKENS} prompt tokens exceeds the "
            f"model's context of {max_positions} positions: at most {max_positions - MAX_PROMPT_TOKENS}"
        )
    if steps is not None and steps < 2:
        raise WorkloadError(f"--steps must be >= 2 (the first is warm-up and left out), got {steps}")


def trained_samples_per_s(side: str, w: Workload, walls: list[float], trained: list[float]) -> float:
    """Samples/s from what a side's own record says it trained in each measured step (walls and
    trained: one entry per step after the warm-up). Refuses (WorkloadError) a run in which any
    step trained a different number of samples than the workload's batch: that run did not do
    the work it would be credited with. Median trained samples / median step time."""
    if not walls or len(walls) != len(trained):
        raise WorkloadError(f"{side}: {len(walls)} step times but {len(trained)} trained-sample counts")
    wrong = [(i, n) for i, n in enumerate(trained) if n != w.batch]
    if wrong:
        raise WorkloadError(
            f"{side}: the workload is {w.batch} samples per step ({w.describe()}) but measured step(s) "
            + ", ".join(f"#{i + 1} trained {n:g}" for i, n in wrong)
            + ": refusing to count samples that were not trained"
        )
    return statistics.median(trained) / statistics.median(walls)


def settings_rows(ours: dict[str, str], trl: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(setting, ours, TRL, differs) for every setting either side states; settings that
    differ first, so the table's header shows them before the ones the sides share."""
    rows = [(k, ours.get(k, "-"), trl.get(k, "-")) for k in dict.fromkeys([*ours, *trl])]
    return sorted(((k, a, b, a != b) for k, a, b in rows), key=lambda r: not r[3])


def settings_header(rows: list[tuple[str, str, str, bool]]) -> str:
    """Markdown: the settings that differ between the sides, then those they share."""
    differ = [f"{k}: ours {a}, TRL {b}" for k, a, b, d in rows if d]
    same = [f"{k} {a}" for k, a, _, d in rows if not d]
    return (
        "Settings that differ between the sides: " + ("; ".join(differ) if differ else "none") + ".\n"
        "Settings both sides share: " + "; ".join(same) + "."
    )


def target_line(name: str, value: float | None, target: float, at_least: bool, unit: str = "x") -> str:
    """'samples/s vs TRL >= 2.5x: 1.04x, not met' (value None: the figure is missing)."""
    sign = ">=" if at_least else "<="
    if value is None:
        return f"- {name} {sign} {target:g}{unit}: no figure (a part failed or was not run), not met"
    met = value >= target if at_least else value <= target
    return f"- {name} {sign} {target:g}{unit}: {value:.2f}{unit}, {'met' if met else 'not met'}"


def side_settings(static: dict[str, str], records: dict[str, dict | None]) -> dict[str, str]:
    """A side's settings: the fixed ones (`static`) plus what its runs recorded about themselves.
    records: {grad-checkpointing value: the part's results, None if it failed, {"refused": why}}."""
    out = dict(static)
    ran = {gc: r for gc, r in records.items() if r and "refused" not in r and "not_implemented" not in r}
    out["gradient checkpointing"] = (
        ", ".join(
            (ran[gc].get("grad_checkpointing", gc) if gc in ran else f"{gc} {'refused' if records[gc] else 'failed'}")
            for gc in records
        )
        or "not run"
    )
    if ran:
        first = next(iter(ran.values()))
        out["torch threads per process"] = f"{first['threads']:g}" if "threads" in first else "?"
        out["micro-batch rows"] = f"{first['micro_batch_rows']:g}" if "micro_batch_rows" in first else "?"
        trained = sorted({n for r in ran.values() for n in r.get("trained_samples_per_step", [])})
        out["samples trained per step (own record)"] = ", ".join(f"{n:g}" for n in trained) or "?"
    return out
