"""Checks a run passes before Ray or any actor starts (actors/launch.py `run()` calls them).

`load_config` already checked types, ranges, finite numbers, duplicate keys and names with a
fixed set of values. What it cannot see without looking around is checked here, each problem
naming its field path and, for a misspelt name, the closest known one:

- data.source / data.eval_source: a reasoning-gym task reasoning_gym knows, with task_kwargs its
  config accepts; a data file that exists and has a supported suffix; a source that can feed the
  algorithm (reasoning-gym makes no preference pairs; imdb prompts have no answer to verify);
- rewards[i].function for kind=python: the file exists and parses, and defines the function at
  top level. Read with `ast`, never imported: no user code runs here (the reward worker imports
  the file later, when the coordinator builds the reward functions).

Rows are not read here: data loading checks every row (rlhf.data.sources), also before any actor.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, RunConfig
from rlhf.data.sources import FILE_SUFFIXES
from rlhf.names import did_you_mean
from rlhf.rewards.verifiers import REWARD_SAMPLE_FIELDS


def check_before_start(cfg: RunConfig) -> None:
    """Raise ConfigError listing every problem found (one line each), or return."""
    problems = data_problems(cfg) + reward_problems(cfg)
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- data
def _data_kind(cfg: RunConfig) -> str:
    if cfg.is_rl:
        return "prompts"
    return "sft" if cfg.algorithm.name == "sft" else "preference"


def data_problems(cfg: RunConfig) -> list[str]:
    data, kind = cfg.data, _data_kind(cfg)
    problems = []
    for key in ("source", "eval_source"):
        source = getattr(data, key)
        if source is None:
            continue
        where = f"data.{key} = {source!r}"
        if source.startswith("reasoning_gym:"):
            problems += _reasoning_gym_problems(where, source.removeprefix("reasoning_gym:"), cfg, kind)
        elif source == "imdb":
            problems += _imdb_problems(where, cfg, kind)
        else:
            path = Path(source)
            if path.suffix in FILE_SUFFIXES and not path.is_file():
                here = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
                problems.append(f"{where}: no such file{here}")
            elif path.is_file() and path.suffix not in FILE_SUFFIXES:
                problems.append(
                    f"{where}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
                )
            # anything else is a `datasets` name or folder: only loading it can tell
            if data.task_kwargs and key == "source":
                problems.append(
                    f"data.task_kwargs = {data.task_kwargs}: only reasoning_gym:<task> and imdb take "
                    f"task_kwargs, not {source!r}"
                )
    return problems


def _reasoning_gym_problems(where: str, task: str, cfg: RunConfig, kind: str) -> list[str]:
    from rlhf.data.reasoning_gym import task_kwargs_problem, task_name_problem

    if problem := task_name_problem(task):
        return [f"{where}: {problem}"]
    if kind == "preference":
        return [
            f"{where}: makes prompts with answers, not the preference pairs algorithm.name="
            f"{cfg.algorithm.name!r} trains on; use a file or 'imdb'"
        ]
    if problem := task_kwargs_problem(task, cfg.data.task_kwargs, cfg.data.seed, max(cfg.data.train_size, 1)):
        return [f"data.task_kwargs = {cfg.data.task_kwargs}: {problem}"]
    return []


def _imdb_problems(where: str, cfg: RunConfig, kind: str) -> list[str]:
    from rlhf.data import imdb

    problems = []
    builders: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "prompts": imdb.imdb_prompts,
        "preference": imdb.imdb_preference_pairs,
        "sft": imdb.imdb_sft_pairs,
    }
    build = builders[kind]
    options = [name for name in inspect.signature(build).parameters if name not in ("n", "seed", "split")]
    for option in cfg.data.task_kwargs:
        if option not in options:
            problems.append(
                f"data.task_kwargs.{option}: imdb {kind} take no option {option!r}"
                f"{did_you_mean(option, options)} (options: {', '.join(options)})"
            )
    if cfg.is_rl:
        for i, reward in enumerate(cfg.rewards):
            if REWARD_SAMPLE_FIELDS.get(reward.kind):
                fields = " and ".join(REWARD_SAMPLE_FIELDS[reward.kind])
                problems.append(
                    f"rewards.{i}.kind = {reward.kind!r} reads each prompt's {fields}, which "
                    f"{where} prompts do not have; use a reward model (kind: model) or another source"
                )
    return problems


# ---------------------------------------------------------------------------------- rewards
def reward_problems(cfg: RunConfig) -> list[str]:
    problems = []
    for i, reward in enumerate(cfg.rewards):
        # (RewardSpec requires a function for kind=python; the None check is for the type checker)
        if (
            reward.kind == "python"
            and reward.function is not None
            and (problem := python_function_problem(reward.function))
        ):
            problems.append(f"rewards.{i}.function = {reward.function!r}: {problem}")
    return problems


def python_function_problem(target: str) -> str | None:
    """What stops `path/to/file.py:name` from naming a function, found without running the file."""
    path, _, name = target.rpartition(":")
    file = Path(path)
    if not file.is_file():
        here = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        return f"file {path!r} does not exist{here}"
    if file.suffix != ".py":
        return f"{path!r} is not a .py file"
    try:
        tree = ast.parse(file.read_bytes(), filename=path)
    except SyntaxError as e:
        return f"{path} does not parse: line {e.lineno}: {e.msg}"
    except ValueError as e:  # e.g. null bytes in the source
        return f"{path} does not parse: {e}"
    names, dynamic = top_level_names(tree.body)
    if name in names or dynamic:  # a star import or module __getattr__ may define it: the import will tell
        return None
    return f"{path} defines no top-level {name!r}{did_you_mean(name, names)}"


def top_level_names(body: list[ast.stmt]) -> tuple[set[str], bool]:
    """(names a module body binds at top level, whether it may bind others we cannot see)."""
    names: set[str] = set()
    dynamic = False
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                dynamic |= alias.name == "*"
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            # definitions under `if`/`try` (e.g. an optional import) count wherever they are
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                inner, inner_dynamic = top_level_names(block)
                names |= inner
                dynamic |= inner_dynamic
    return names - {"*"}, dynamic or "__getattr__" in names
