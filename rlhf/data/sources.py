"""Load prompts, preference pairs and SFT pairs from whatever `data.source` names.

Sources (`DataConfig.source`):
- `reasoning_gym:<task>`: generated problems with verifiable answers (rlhf.data.reasoning_gym);
- `imdb`: built-in movie reviews (rlhf.data.imdb);
- a local `.jsonl`, `.json` or `.parquet` file, or any `datasets` name (hub id or folder), read
  with the configured field names (`prompt_field`, `answer_field`, ...).

Every returned row has normalised keys: prompts -> `prompt` (+ `answer` and every other field
kept as metadata); preference -> `prompt`, `chosen`, `rejected`; SFT -> `prompt`, `response`
(for `reasoning_gym:<task>` the response is the gold answer; with `data.sft_target:
calculator_transcript`, two pairs per problem with a `messages` context: the calculator call, and
the answer after the tool's result).
`data.prompt_suffix` is appended to every prompt.

Rows from files are untrusted and validated before anything trains: a bad row (bytes that are
not UTF-8, malformed JSON, a key given twice, a missing field, a wrong type, an empty text, a text
too long, or a field a configured reward reads, such as the answer) either stops the run with a
list of problems naming file, row and field (`on_bad_row: strict`) or is dropped and counted
(`on_bad_row: skip`).

Splits: `split="train"` or `"eval"`. Eval comes from `data.eval_source` when set (the whole of
it for files; its held-out part for built-ins). Without it, eval is held out of `data.source`:
- reasoning_gym: another seed, minus questions seen in train (see rlhf.data.reasoning_gym);
- imdb: the fixed hash split of review texts (see rlhf.data.imdb);
- files: the rows are shuffled with `data.seed`; the first `eval_size` distinct prompts go to
  eval with every row that has one of those prompts, and train gets all other rows. Splitting by
  prompt keeps several pairs of one prompt on one side, so the two sets share no prompt.
`train_size` caps the train rows of a file (a seeded sample; a warning says how many were left
out); built-in sources draw exactly `train_size` / `eval_size` examples.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from rlhf.rewards.verifiers import REWARD_SAMPLE_FIELDS

if TYPE_CHECKING:
    from rlhf.config import DataConfig, RewardSpec

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_PROBLEMS_SHOWN = 20
# Lengths are checked in characters, before any tokenizer exists. No English text averages more
# than ~6 characters per token, so a text over 8 x the token budget cannot fit it.
CHARS_PER_TOKEN_CEILING = 8

Kind = Literal["prompts", "preference", "sft"]


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, the rows and the fields."""


@dataclass(frozen=True)
class UnreadableRow:
    """A JSONL line that is not a JSON object; kept in place so row numbers stay line numbers."""

    error: str


@dataclass
class RowReport:
    """What validation found: `len(good) + bad_rows == total_rows`."""

    total_rows: int
    bad_rows: int = 0
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- reading
def load_rows(source: str, split: str = "train") -> list[dict[str, Any] | UnreadableRow]:
    """Rows of a local .jsonl/.json/.parquet file or a `datasets` name (`split` is for the latter).

    JSONL is read line by line so a malformed line becomes an `UnreadableRow` at its place
    (row n = line n; blank lines at the end of the file are not rows). .json and .parquet go
    through `datasets`, which fills a field missing from a row with None.
    """
    path = Path(source)
    is_file = path.suffix in FILE_SUFFIXES
    if is_file and not path.is_file():
        raise DataError(f"{source}: no such file")
    if path.is_file() and not is_file:
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    import datasets  # deferred: it is slow to import and only file/hub sources need it

    try:
        if is_file:
            builder = "parquet" if path.suffix == ".parquet" else "json"
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except Exception as e:
        hint = (
            "For a row-by-row error report, convert the file to JSON Lines (.jsonl)."
            if is_file
            else "Is the name (or folder) right, the split in it (data.split), and the hub reachable?"
        )
        raise DataError(
            f"{source}: could not load with `datasets` (split {split!r}): {type(e).__name__}: {e}. {hint}"
        ) from e
    rows: list[dict[str, Any] | UnreadableRow] = dataset.to_list()
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any] | UnreadableRow]:
    # Bytes, split on b"\n" only: str.splitlines() would also split at U+2028, U+0085 or a lone \r
    # inside a JSON string, and decoding the whole file at once would lose every row to one bad byte.
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8).rstrip()
    return [_parse_jsonl_line(line) for line in data.split(b"\n")] if data else []


def _parse_jsonl_line(line: bytes) -> dict[str, Any] | UnreadableRow:
    if not line.strip():
        return UnreadableRow("blank line (JSON Lines holds one object per line)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return UnreadableRow(
            f"not UTF-8 text: byte {line[e.start]:#04x} at byte {e.start + 1} of the line ({e.reason})"
        )
    try:
        row = json.loads(text, object_pairs_hook=_object_without_repeats, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, _NotStrictJSON) as e:
        return UnreadableRow(f"invalid JSON: {e}")
    return row if isinstance(row, dict) else UnreadableRow(f"expected a JSON object, got {type(row).__name__}")


class _NotStrictJSON(ValueError):
    """What Python's json accepts but JSON does not, or keeps silently: NaN, Infinity, repeated keys."""


def _object_without_repeats(pairs: list[tuple[str, object]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotStrictJSON(f"key {key!r} appears twice in one object (JSON parsers keep only one)")
        out[key] = value
    return out


def _refuse_constant(name: str) -> NoReturn:
    raise _NotStrictJSON(f"{name} is not a JSON number")


# ---------------------------------------------------------------------------------- validation
def row_problems(
    row: dict[str, Any] | UnreadableRow, required: Mapping[str, type | tuple[type, ...]], max_chars: Mapping[str, int]
) -> list[str]:
    """Problems of one row as `field 'x': what is wrong` (empty if the row is good)."""
    if isinstance(row, UnreadableRow):
        return [row.error]
    problems = []
    for name, expected in required.items():
        value = row.get(name)
        if value is None:
            problems.append(f"field {name!r}: missing" + (" (null)" if name in row else ""))
        elif not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            want = " or ".join(t.__name__ for t in expected) if isinstance(expected, tuple) else expected.__name__
            problems.append(f"field {name!r}: expected {want}, got {type(value).__name__} {_short(value)}")
        elif isinstance(value, str) and not value.strip():
            problems.append(f"field {name!r}: empty string")
        elif name in max_chars and isinstance(value, Sized) and len(value) > max_chars[name]:
            problems.append(f"field {name!r}: too long ({len(value)} characters, limit {max_chars[name]})")
    return problems


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_rows(
    rows: Sequence[dict[str, Any] | UnreadableRow],
    required: Mapping[str, type | tuple[type, ...]],
    source: str,
    max_chars: Mapping[str, int] | None = None,
    on_bad_row: Literal["strict", "skip"] = "strict",
    more_checks: Callable[[dict[str, Any]], list[str]] | None = None,
) -> tuple[list[dict[str, Any]], RowReport]:
    """Keep rows whose `required` fields exist, have the type, are non-empty and fit `max_chars`,
    and in which `more_checks(row)` finds no problem.

    Each problem reads `"{source}: row {n}: field 'x': ..."` (n is 1-based; the line for JSONL).
    strict: raise DataError listing the first MAX_PROBLEMS_SHOWN problems and the totals.
    skip: return the good rows and the report (and log a warning with the count).
    """
    if on_bad_row not in ("strict", "skip"):
        raise ValueError(f"on_bad_row must be 'strict' or 'skip', got {on_bad_row!r}")
    good: list[dict[str, Any]] = []
    report = RowReport(total_rows=len(rows))
    for n, row in enumerate(rows, start=1):
        problems = row_problems(row, required, max_chars or {})
        if more_checks is not None and not isinstance(row, UnreadableRow):
            problems += more_checks(row)
        if problems:
            report.bad_rows += 1
            report.problems += [f"{source}: row {n}: {p}" for p in problems]
        else:
            assert not isinstance(row, UnreadableRow)  # an unreadable row always has a problem
            good.append(row)
    if report.bad_rows:
        summary = f"{source}: {report.bad_rows} of {report.total_rows} rows are bad ({len(report.problems)} problems)"
        shown = "\n  ".join(report.problems[:MAX_PROBLEMS_SHOWN])
        more = len(report.problems) - MAX_PROBLEMS_SHOWN
        shown += f"\n  ... and {more} more" if more > 0 else ""
        if on_bad_row == "strict" or not good:
            hint = "fix them, or set data.on_bad_row=skip to drop them" if good else "no good rows are left"
            raise DataError(f"{summary}; {hint}:\n  {shown}")
        log.warning("%s; skipping them (data.on_bad_row=skip):\n  %s", summary, shown)
    return good, report


# ------------------------------------------------------------------------------------ dispatch
def load_prompts(
    data_cfg: DataConfig, split: str = "train", rewards: Sequence[RewardSpec] = ()
) -> list[dict[str, Any]]:
    """Prompts for generation: `prompt`, and `answer` plus any metadata the source has.

    `rewards`: the run's reward specs; a row lacking a field one of them reads (see
    verifiers.REWARD_SAMPLE_FIELDS) is a bad row, like a row without a prompt.
    """
    return _load("prompts", data_cfg, split, tuple(sorted({r.kind for r in rewards})))


def load_preference_pairs(data_cfg: DataConfig, split: str = "train") -> list[dict[str, Any]]:
    """Preference pairs: `prompt`, `chosen`, `rejected` (plus any other fields of the source)."""
    return _load("preference", data_cfg, split)


def load_sft_pairs(data_cfg: DataConfig, split: str = "train") -> list[dict[str, Any]]:
    """Supervised pairs: `prompt`, `response` (plus any other fields of the source)."""
    return _load("sft", data_cfg, split)


def _load(kind: Kind, cfg: DataConfig, split: str, reward_kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and cfg.eval_size == 0 and not cfg.eval_source:
        return []
    source = cfg.eval_source if split == "eval" and cfg.eval_source else cfg.source
    builtin = source.startswith("reasoning_gym:") or source == "imdb"
    checks = _reward_field_checks(reward_kinds, cfg, source, from_file=not builtin)
    if builtin:
        rows = _builtin_rows(kind, source, cfg, split, verified="reasoning_gym" in reward_kinds)
        if checks is not None:
            rows, _ = validate_rows(rows, {}, source, on_bad_row=cfg.on_bad_row, more_checks=checks)
    else:
        # part: "whole" for a separate eval source, else this side of the held-out split
        part = "whole" if source != cfg.source else split
        rows = _file_rows(kind, source, cfg, part, checks)
    return [{**row, "prompt": row["prompt"] + cfg.prompt_suffix} for row in rows]


def _builtin_rows(kind: Kind, source: str, cfg: DataConfig, split: str, verified: bool = False) -> list[dict[str, Any]]:
    """verified: the run scores with reward kind reasoning_gym, so each gold answer must also earn it."""
    size = cfg.train_size if split == "train" else cfg.eval_size
    if source == "imdb":
        from rlhf.data import imdb

        build: dict[Kind, Callable[..., list[dict[str, Any]]]] = {
            "prompts": imdb.imdb_prompts,
            "preference": imdb.imdb_preference_pairs,
            "sft": imdb.imdb_sft_pairs,
        }
        try:
            return build[kind](size, seed=cfg.seed, split=split, **cfg.task_kwargs)
        except (TypeError, ValueError) as e:
            raise DataError(f"data.source=imdb ({kind}, data.task_kwargs={cfg.task_kwargs}): {e}") from e
    task = source.removeprefix("reasoning_gym:")
    if kind == "preference":
        raise DataError(
            f"data.source={source!r} makes prompts with answers, not preference pairs; use a file or 'imdb'"
        )
    from rlhf.data.reasoning_gym import (
        gold_answer_problems,
        reasoning_gym_prompts,
        task_kwargs_problem,
        task_name_problem,
        train_heldout_split,
    )

    key = "data.source" if source == cfg.source else "data.eval_source"
    if problem := task_name_problem(task):
        raise DataError(f"{key} = {source!r}: {problem}")
    if problem := task_kwargs_problem(task, cfg.task_kwargs, cfg.seed, max(size, 1)):
        raise DataError(f"data.task_kwargs = {cfg.task_kwargs}: {problem}")
    if split == "train":
        rows = reasoning_gym_prompts(task, size, cfg.seed, cfg.task_kwargs, suffix="")
    else:
        rows = train_heldout_split(task, cfg.train_size, size, cfg.seed, cfg.task_kwargs, suffix="")[1]
    # every gold answer must be a right answer to its question (generators can be wrong): bad rows otherwise
    rows, _ = validate_rows(
        rows,
        {},
        f"{source} ({split})",
        on_bad_row=cfg.on_bad_row,
        more_checks=lambda r: gold_answer_problems(r, task, verified),
    )
    if kind == "sft" and cfg.sft_target == "calculator_transcript":
        return _calculator_transcript_rows(rows, source, split)
    # SFT on a task: the gold answer is the target response (the `answer` stays for scoring).
    return [row | {"response": row["answer"]} for row in rows] if kind == "sft" else rows


def _calculator_transcript_rows(rows: list[dict[str, Any]], source: str, split: str) -> list[dict[str, Any]]:
    """SFT pairs of a calculator episode, two per problem (the agent demo's warm start): the call
    after the question, and the result as the answer after the tool's reply. Each has `messages`
    (the context the SFT loop renders with the chat template). `answer` becomes the response, so
    the SFT loop's held-out exact match is of these turns; the gold answer stays as `gold_answer`."""
    from rlhf.environments.calculator import CalculatorError, call_demonstration

    out, problems = [], []
    for n, row in enumerate(rows, start=1):
        try:
            pairs = call_demonstration(row)
        except (ValueError, CalculatorError) as e:  # the question has no expression the calculator computes
            problems.append(f"{source} ({split}): row {n}: {e}")
            continue
        out += [row | pair | {"answer": pair["response"], "gold_answer": row["answer"]} for pair in pairs]
    if problems:
        raise DataError(
            "data.sft_target='calculator_transcript': no calculator call gives the gold answer of "
            f"{len(problems)} rows:\n  " + "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        )
    return out


# Normalised key -> the configured field it comes from, per kind (all are required strings).
def _fields(kind: Kind, cfg: DataConfig) -> dict[str, str]:
    return {
        "prompts": {"prompt": cfg.prompt_field},
        "preference": {"prompt": cfg.prompt_field, "chosen": cfg.chosen_field, "rejected": cfg.rejected_field},
        "sft": {"prompt": cfg.prompt_field, "response": cfg.response_field},
    }[kind]


def _file_rows(
    kind: Kind, source: str, cfg: DataConfig, part: str, checks: Callable[[dict[str, Any]], list[str]] | None = None
) -> list[dict[str, Any]]:
    if cfg.task_kwargs:
        raise DataError(
            f"data.task_kwargs={cfg.task_kwargs} only applies to reasoning_gym:<task> and imdb, not {source!r}"
        )
    fields = _fields(kind, cfg)
    response_chars = cfg.max_response_len * CHARS_PER_TOKEN_CEILING
    max_chars = {f: response_chars for f in fields.values()} | {
        cfg.prompt_field: cfg.max_prompt_len * CHARS_PER_TOKEN_CEILING
    }
    rows, _ = validate_rows(
        load_rows(source, cfg.split), dict.fromkeys(fields.values(), str), source, max_chars, cfg.on_bad_row, checks
    )
    if kind == "prompts":
        fields = fields | {"answer": cfg.answer_field}  # optional: kept when present
    rows = [_rename(row, fields) for row in rows]
    if part == "whole":
        return rows
    train, heldout = hold_out_by_prompt(rows, cfg.eval_size, cfg.seed, source)
    if part == "eval":
        return heldout
    if len(train) > cfg.train_size:
        log.warning("%s: using %d of %d train rows (data.train_size)", source, cfg.train_size, len(train))
        train = train[: cfg.train_size]
    return train


def _reward_field_checks(
    reward_kinds: Sequence[str], cfg: DataConfig, source: str, from_file: bool
) -> Callable[[dict[str, Any]], list[str]] | None:
    """A row check for the fields the run's rewards read (None if they read none).

    File rows are checked as read (before renaming), so the gold answer is under the configured
    data.answer_field; built-in rows have it as `answer`.
    """
    needs: dict[str, str] = {}  # field -> the reward kind named in the message
    for kind in reward_kinds:
        for name in REWARD_SAMPLE_FIELDS.get(kind, ()):
            needs.setdefault(name, kind)
    null_answer_ok = "math" not in reward_kinds  # reasoning-gym tasks may have a null answer (see verifiers)
    if not null_answer_ok:
        needs["answer"] = "math"
    # with data.source=reasoning_gym:<task> the task is known; otherwise each row's metadata names it
    needs_task = "metadata" in needs and not source.startswith("reasoning_gym:")
    if not needs:
        return None
    answer_key = cfg.answer_field if from_file else "answer"
    mapped = f"data.answer_field={cfg.answer_field!r}" if from_file else f"rows of {source!r} have none"

    def check(row: dict[str, Any]) -> list[str]:
        problems = []
        if "answer" in needs:
            value, why = row.get(answer_key), f"reward kind {needs['answer']!r} scores against it ({mapped})"
            if value is None:
                if answer_key not in row or not null_answer_ok:
                    problems.append(f"field {answer_key!r}: missing" + " (null)" * (answer_key in row) + f"; {why}")
            elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
                problems.append(f"field {answer_key!r}: expected a string or number, got {type(value).__name__}; {why}")
            elif (isinstance(value, str) and not value.strip()) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                problems.append(f"field {answer_key!r}: empty or not a number ({value!r}); {why}")
        if needs_task:
            problems += _task_metadata_problems(row.get("metadata"))
        return problems

    return check


def _task_metadata_problems(metadata: object) -> list[str]:
    from rlhf.data.reasoning_gym import task_name_problem

    why = (
        "reward kind 'reasoning_gym' scores each row with the task its metadata.source_dataset names, "
        "as data.source is not reasoning_gym:<task>"
    )
    if not isinstance(metadata, dict):
        got = "missing" if metadata is None else f"expected an object, got {type(metadata).__name__}"
        return [f"field 'metadata': {got}; {why}"]
    task = metadata.get("source_dataset")
    if not isinstance(task, str):
        return [f"field 'metadata.source_dataset': missing or not a string; {why}"]
    problem = task_name_problem(task)
    return [f"field 'metadata.source_dataset' = {task!r}: {problem}"] if problem else []


def _rename(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Row with configured field names replaced by normalised keys; nothing is lost.

    A column that already has a normalised name but is not the configured field (say a
    `prompt` column while prompt_field='question') is kept as `source_prompt`.
    """
    out = dict(row)
    values = {key: out.pop(name) for key, name in fields.items() if name in out}
    for key in values:
        if key in out:
            out[f"source_{key}"] = out.pop(key)
    return out | values


def hold_out_by_prompt(
    rows: list[dict[str, Any]], eval_size: int, seed: int, source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout): `eval_size` distinct prompts, drawn with `seed`, and all their rows go to heldout.

    Train comes back in the same seeded order, so taking its first k rows is a random sample.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    heldout_prompts: set[str] = set()
    for i in order:
        if len(heldout_prompts) == eval_size:
            break
        heldout_prompts.add(rows[i]["prompt"])
    if len(heldout_prompts) < eval_size:
        raise DataError(
            f"{source}: data.eval_size={eval_size} but the file has only {len(heldout_prompts)} distinct prompts"
        )
    train = [rows[i] for i in order if rows[i]["prompt"] not in heldout_prompts]
    heldout = [rows[i] for i in order if rows[i]["prompt"] in heldout_prompts]
    if not train:
        raise DataError(f"{source}: holding out data.eval_size={eval_size} prompts leaves no train rows; lower it")
    return train, heldout
