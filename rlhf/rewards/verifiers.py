"""Verifiable rewards: plain callables `(completions, samples) -> list[float]`, as in TRL.

`samples` are the prompt dicts the completions answer (see rlhf.data.reasoning_gym): one per
completion, so a prompt sampled n times appears n times. A reward function never raises on a
bad completion; whatever cannot be read or checked scores 0.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

RewardFn = Callable[[list[str], list[dict[str, Any]]], list[float]]

# The sample fields each reward kind reads. A prompt row without them can only ever score 0 (the
# functions below never raise), so data loading reports such rows as bad (rlhf.data.sources)
# instead of letting a typo in data.answer_field silently stop all learning.
#   math           sample["answer"]: the gold answer (from data.answer_field)
#   reasoning_gym  sample["answer"] and sample["metadata"] (the task's scorer reads them); without a
#                  task in data.source, metadata["source_dataset"] names the task to score with. The
#                  answer may be null: some tasks (rush_hour, graph_color, ...) score from metadata alone
REWARD_SAMPLE_FIELDS: dict[str, tuple[str, ...]] = {"math": ("answer",), "reasoning_gym": ("answer", "metadata")}

# An optionally signed number with optional thousands commas and decimals: "-1,000.5", "42".
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
ONLY_A_NUMBER = r"\s*-?\d+(?:,\d{3})*(?:\.\d+)?\s*"
BOXED_ANSWER = r"(?s).*\\boxed\{.+\}.*"


def last_number(text: str) -> str | None:
    """The last number written in `text` ("2 + 3 = 5." -> "5"), or None."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, nested braces included, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None  # unclosed brace: no answer


def final_answer(text: str) -> str | None:
    """The answer a completion commits to: last `\\boxed{}`, else text after `####`, else last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    return last_number(text)


# ------------------------------------------------------------------------------- reasoning-gym
@cache
def _reasoning_gym_scorer(task: str) -> Callable[..., float]:
    import reasoning_gym

    scorer: Callable[..., float] = reasoning_gym.get_score_answer_fn(task)  # (answer, entry=...) -> score
    return scorer


def reasoning_gym_reward(
    task: str | None = None, extract_answer: Callable[[str], str | None] = last_number
) -> RewardFn:
    """Score with the reasoning-gym task's own `score_answer` on the extracted answer.

    The task is `task`, else each sample's `metadata["source_dataset"]`, so one reward
    function serves a mix of tasks. The default extractor takes the last number, which suits
    numeric tasks (chain_sum, basic_arithmetic, gsm_symbolic); pass another for the rest.
    """

    def reasoning_gym_reward(completions: list[str], samples: list[dict[str, Any]]) -> list[float]:
        rewards: list[float] = []
        for completion, sample in zip(completions, samples, strict=True):
            try:
                scorer = _reasoning_gym_scorer(task or sample["metadata"]["source_dataset"])
                entry = {k: sample[k] for k in ("question", "answer", "metadata") if k in sample}
                rewards.append(float(scorer(extract_answer(completion), entry=entry)))
            except Exception:  # a malformed completion or sample scores 0; it must not stop a run
                rewards.append(0.0)
        return rewards

    return reasoning_gym_reward


# ------------------------------------------------------------------------------- math answers
def math_answer_reward(timeout_seconds: int = 5, answer_key: str = "answer") -> RewardFn:
    """1 if the completion's final answer equals `sample[answer_key]` per Hugging Face math-verify.

    Equivalent forms match (`\\frac{1}{2}` vs 0.5, `1,000` vs 1000, `x+1` vs `1+x`). The answer
    is taken from the last `\\boxed{}`, then `####`, then the last number. math-verify bounds
    parsing and checking by `timeout_seconds` with SIGALRM, which Python allows only on the main
    thread; elsewhere (e.g. a threaded Ray actor) the check runs without a time limit, so put
    slow symbolic checks on a process's main thread.
    """
    from math_verify import parse, verify

    def as_math(answer: str) -> list[object]:  # math-verify's parse: sympy expressions and strings
        # Wrapping in \boxed{} makes math-verify read the whole string, LaTeX or plain.
        parsed: list[object] = parse(f"\\boxed{{{answer}}}", parsing_timeout=limit())
        return parsed

    def limit() -> int | None:
        if threading.current_thread() is threading.main_thread():
            return timeout_seconds
        warnings.warn("math_answer_reward off the main thread: math-verify runs without a timeout", stacklevel=2)
        return None

    def math_answer_reward(completions: list[str], samples: list[dict[str, Any]]) -> list[float]:
        rewards: list[float] = []
        for completion, sample in zip(completions, samples, strict=True):
            try:
                answer = final_answer(completion)
                ok = answer is not None and verify(
                    as_math(str(sample[answer_key])), as_math(answer), timeout_seconds=limit()
                )
                rewards.append(1.0 if ok else 0.0)
            except Exception:  # includes math-verify's TimeoutException
                rewards.append(0.0)
        return rewards

    return math_answer_reward


# ------------------------------------------------------------------------------------- format
def format_reward(pattern: str = ONLY_A_NUMBER, score: float = 1.0) -> RewardFn:
    """`score` when the whole completion matches the regex `pattern`, else 0.

    The default asks for nothing but a number (the chain_sum prompt's instruction); use
    BOXED_ANSWER for "a \\boxed{} answer somewhere" in math tasks.
    """
    compiled = re.compile(pattern)

    def format_reward(completions: list[str], samples: list[dict[str, Any]]) -> list[float]:
        return [score if compiled.fullmatch(c) else 0.0 for c in completions]

    return format_reward
