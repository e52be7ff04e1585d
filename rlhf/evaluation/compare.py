"""Before/after comparison of two evaluations from their sample records (the JSONL files a run
writes to samples/eval-<updates>.jsonl and `recipes.evaluate` to samples-<model>.jsonl).

For each mode (greedy, sampled) and each score (the training reward, every judge), the scores
are averaged per prompt (k sampled answers -> one number per prompt) and the two evaluations are
compared prompt by prompt (rlhf.evaluation.stats.paired_difference). The sampled pass's
per-prompt means are less noisy than one greedy answer, so its standard error is usually smaller.

`per_sample=True` pairs the j-th sample of each prompt before with the j-th after instead: for
evaluations of a few prompts with many samples each (DPO's three review instructions x 16), where
a per-prompt mean leaves n = 3. The runs sample with a fixed seed, so sample j of a prompt draws
the same random numbers before and after; each pair is still independent of the others, which is
all the standard error needs.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf.evaluation.stats import Paired, paired_difference

Record = dict[str, Any]


def read_records(path: str | Path) -> list[Record]:
    """The records of a samples JSONL file (.jsonl.gz: gzip-compressed, as docs/samples keeps them);
    a line that is not a JSON object names the file and line."""
    records = []
    path = Path(path)
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or "prompt_index" not in record or "mode" not in record:
                raise ValueError(f"{path}:{i}: not a sample record (needs prompt_index and mode)")
            records.append(record)
    return records


def _scores(record: Record) -> dict[str, float | None]:
    judges = record.get("judges") or {}
    return {"reward": record.get("reward")} | {f"judge/{k}": v for k, v in judges.items()}


def per_prompt_scores(records: Iterable[Record], per_sample: bool = False) -> dict[str, dict[str, dict[Any, float]]]:
    """{mode: {score name: {prompt_index: mean over that prompt's samples}}}; missing (None/NaN) scores
    skipped. per_sample: keyed by (prompt_index, j) for the j-th sample of the prompt, no mean."""
    sums: dict[tuple[str, str, Any], list[float]] = defaultdict(list)
    seen: dict[tuple[str, int], int] = defaultdict(int)
    for r in records:
        index = int(r["prompt_index"])
        key: Any = (index, seen[(r["mode"], index)]) if per_sample else index
        seen[(r["mode"], index)] += 1
        for name, value in _scores(r).items():
            if value is not None and not math.isnan(float(value)):
                sums[(r["mode"], name, key)].append(float(value))
    out: dict[str, dict[str, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
    for (mode, name, index), values in sums.items():
        out[mode][name][index] = sum(values) / len(values)
    return {mode: dict(names) for mode, names in out.items()}


def compare_records(
    before: Iterable[Record], after: Iterable[Record], per_sample: bool = False
) -> dict[str, dict[str, Paired]]:
    """{mode: {score name: paired difference (after - before) over the prompts both scored}}.

    Raises ValueError when the two evaluations share no prompt of a mode they both have (they
    answered different prompts: a paired comparison would mean nothing)."""
    b, a = per_prompt_scores(before, per_sample), per_prompt_scores(after, per_sample)
    out: dict[str, dict[str, Paired]] = {}
    for mode in sorted(b.keys() & a.keys()):
        out[mode] = {}
        for name in sorted(b[mode].keys() & a[mode].keys()):
            common = sorted(b[mode][name].keys() & a[mode][name].keys())
            if not common:
                raise ValueError(f"{mode} {name}: the two evaluations share no prompt")
            out[mode][name] = paired_difference([b[mode][name][i] for i in common], [a[mode][name][i] for i in common])
    return out


def means(records: Iterable[Record]) -> dict[str, dict[str, float]]:
    """{mode: {score name: mean over prompts of the per-prompt means}}."""
    return {
        mode: {name: sum(v.values()) / len(v) for name, v in names.items() if v}
        for mode, names in per_prompt_scores(records).items()
    }
