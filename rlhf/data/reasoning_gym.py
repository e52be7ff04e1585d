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

import ast
import dataclasses
import operator
from collections.abc import Callable
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


# ------------------------------------------------------------------------- gold answers checked
# reasoning-gym's generators can state wrong answers (basic_arithmetic with one-digit terms and
# allow_parentheses=False: "4 / 1" with answer 2, "3 / 0" with answer 18). Its scorer compares a
# completion with the row's own answer, so it cannot notice; a run would train on noise. Each row
# is therefore checked at load (rlhf.data.sources: a failing row is a bad row, strict or skip):
# - when the run scores with reward kind reasoning_gym, the gold answer, given as the completion,
#   must score 1.0 with that verifier (reasoning_gym_reward, reading answers as a run does):
#   else no answer can ever earn the full reward;
# - where the row's metadata holds an arithmetic `expression`, its value (computed here) must
#   equal the gold answer: an integer answer exactly, a decimal one to its stated places.
_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def arithmetic_value(expression: str) -> float | None:
    """The value of + - * / arithmetic on numbers with parentheses; None when `expression` is
    anything else (names, calls, powers: no arithmetic check is made). ZeroDivisionError propagates."""
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        return None

    def value(node: ast.AST) -> float | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        return None

    return value(tree.body)


def answer_matches_value(answer: str, value: float) -> bool:
    """An integer answer must equal `value` (to float rounding); one with d decimals, `value` rounded to d places."""
    try:
        gold = float(answer.replace(",", "").strip())
    except ValueError:
        return False
    decimals = len(answer.strip().split(".", 1)[1]) if "." in answer else 0
    slack = 0.5 * 10.0**-decimals if decimals else 0.0
    return abs(gold - value) <= slack + 1e-9 * max(1.0, abs(value))


def gold_answer_problems(row: dict[str, Any], task: str | None = None, verified: bool = True) -> list[str]:
    """Why the row's gold answer is not a right answer to its question (empty: it is); see above.
    verified=False skips the verifier check (a run that does not score with reward kind reasoning_gym)."""
    answer = row.get("answer")
    if answer is None:
        return []  # tasks that score from metadata alone (rush_hour, ...): nothing to check here
    problems = []
    from rlhf.rewards.verifiers import reasoning_gym_reward

    score = reasoning_gym_reward(task)([str(answer)], [row])[0] if verified else 1.0
    if score != 1.0:
        problems.append(
            f"field 'answer' = {answer!r}: the gold answer scores {score:g}, not 1, under the task's verifier "
            "(as the run reads answers: the last number), so no completion can earn the full reward"
        )
    expression = (row.get("metadata") or {}).get("expression")
    if isinstance(expression, str):
        try:
            value = arithmetic_value(expression)
        except ZeroDivisionError:
            problems.append(f"field 'answer' = {answer!r}: the question's expression {expression!r} divides by zero")
        else:
            if value is not None and not answer_matches_value(str(answer), value):
                problems.append(
                    f"field 'answer' = {answer!r}: wrong; the question's expression {expression!r} = {value:g}"
                )
    return problems
