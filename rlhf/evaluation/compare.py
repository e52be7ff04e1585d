"""Before/after comparison of two evaluations from their sample records (the JSONL files a run
writes to samples/eval-<updates>.jsonl and `recipes.evaluate` to samples-<model>.jsonl).

For each mode (greedy, sampled) and each score (the training reward, every judge), the scores
are averaged per prompt (k sampled answers -> one number per prompt) and the two evaluations are
compared prompt by prompt (rlhf.evaluation.stats.paired_difference). The sampled pass's
per-prompt means are less noisy than one greedy answer, so its standard error is usually smaller.
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


def per_prompt_scores(records: Iterable[Record]) -> dict[str, dict[str, dict[int, float]]]:
    """{mode: {score name: {prompt_index: mean over that prompt's samples}}}; missing (None/NaN) scores skipped."""
    sums: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        for name, value in _scores(r).items():
            if value is not None and not math.isnan(float(value)):
                sums[(r["mode"], name, int(r["prompt_index"]))].append(float(value))
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (mode, name, index), values in sums.items():
        out[mode][name][index] = sum(values) / len(values)
    return {mode: dict(names) for mode, names in out.items()}


def compare_records(before: Iterable[Record], after: Iterable[Record]) -> dict[str, dict[str, Paired]]:
    """{mode: {score name: paired difference (after - before) over the prompts both scored}}.

    Raises ValueError when the two evaluations share no prompt of a mode they both have (they
    answered different prompts: a paired comparison would mean nothing)."""
    b, a = per_prompt_scores(before), per_prompt_scores(after)
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
