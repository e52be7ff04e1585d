"""Prompts with verifiable answers from reasoning-gym's offline task generators.

Each sample is a dict: `prompt` (question + suffix, plain text: the chat template is applied
later, per tokenizer), `question`, `answer` (the gold answer string) and `metadata` (which holds
`source_dataset`, the task name its scorer is looked up by; see rlhf.rewards.verifiers).

Train / held-out split: reasoning-gym draws each problem from a seeded generator, so the two
splits are the same task drawn with different seeds: train uses `seed`, held-out uses
`seed + HELDOUT_SEED_OFFSET`. Small task spaces (e.g. 2-3 one-digit terms) repeat problems
across seeds, so `train_heldout_split` also drops held-out questions that occur in train.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from rlhf.names import did_you_mean, unknown_name

DEFAULT_SUFFIX = " Give only the final number."
HELDOUT_SEED_OFFSET = 1_000_003  # far from any seed a run would use for training

# chain_sum difficulty at which SmolLM2-135M-Instruct gets ~17% greedy, enough reward variance
# across samples for GRPO (measured: docs/platform-notes.md; the default difficulty gives ~2%).
CHAIN_SUM_EASY = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def task_name_problem(task: str) -> str | None:
    """ "unknown task; did you mean 'chain_sum'?" when reasoning-gym has no task `task`, else None."""
    return None if task in DATASETS else unknown_name("reasoning-gym task", task, DATASETS)


def task_kwargs_problem(task: str, task_kwargs: dict[str, Any], seed: int = 0, size: int = 1) -> str | None:
    """What is wrong with `task_kwargs` for a known `task` (an unknown option, a value its config
    rejects), or None. Builds the task's config object only: no problem is generated."""
    config_cls = DATASETS[task][1]
    for taken in ("seed", "size"):
        if taken in task_kwargs:
            return f"{taken!r} is set by data.{'seed' if taken == 'seed' else 'train_size / data.eval_size'}, not task_kwargs"
    if dataclasses.is_dataclass(config_cls):
        options = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
        for key in task_kwargs:
            if key not in options:
                return f"{task} has no option {key!r}{did_you_mean(key, options)} (options: {', '.join(options)})"
    try:
        config = config_cls(**task_kwargs, seed=seed, size=size)
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        return f"{task} rejects them: {type(e).__name__}: {e}"
    return None


def reasoning_gym_prompts(
    task: str = "chain_sum",
    size: int = 64,
    seed: int = 0,
    task_kwargs: dict[str, Any] | None = None,
    suffix: str = DEFAULT_SUFFIX,
) -> list[dict[str, Any]]:
    """`size` problems of reasoning-gym `task`, generated deterministically from `seed`."""
    dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **(task_kwargs or {}))
    return [
        {
            "prompt": entry["question"] + suffix,
            "question": entry["question"],
            "answer": entry["answer"],
            "metadata": entry["metadata"],
        }
        for entry in dataset
    ]


def train_heldout_split(
    task: str = "chain_sum",
    train_size: int = 1000,
    heldout_size: int = 100,
    seed: int = 0,
    task_kwargs: dict[str, Any] | None = None,
    suffix: str = DEFAULT_SUFFIX,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train prompts from `seed`; held-out prompts from another seed, minus questions in train.

    Raises if the task's problem space is too small to find `heldout_size` unseen questions.
    """
    train = reasoning_gym_prompts(task, train_size, seed, task_kwargs, suffix)
    seen = {sample["question"] for sample in train}
    heldout: list[dict[str, Any]] = []
    draw = heldout_size
    for _ in range(4):  # draw more each time, until enough unseen questions turn up
        candidates = reasoning_gym_prompts(task, draw, seed + HELDOUT_SEED_OFFSET, task_kwargs, suffix)
        heldout = [sample for sample in candidates if sample["question"] not in seen][:heldout_size]
        if len(heldout) == heldout_size:
            return train, heldout
        draw *= 4
    raise ValueError(
        f"only {len(heldout)} of {heldout_size} held-out {task} questions are unseen in train: "
        "make the task harder (task_kwargs) or the train set smaller"
    )
