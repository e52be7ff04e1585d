"""A reward that never varies teaches nothing: say so loudly, early.

A reward function that gives every sample of the first batches the same value (all 0: a wrong
answer key, a format the model never hits; all equal: a bug, a fallback on every sample) makes
every advantage zero, and the run trains on nothing while looking healthy.
"""

from __future__ import annotations

CONSTANT_REWARD_BATCHES = 3  # batches watched from the start of a run


def constant_rewards(batches: list[dict[str, list[float]]]) -> dict[str, float]:
    """{reward name: its one value} for each reward that gave every sample of every batch the same value.

    `batches` holds one {reward name: per-sample values} per scored batch. A reward missing from
    a batch, or an empty history, is not judged.
    """
    if not batches:
        return {}
    names = set(batches[0]).intersection(*batches[1:])
    constant = {}
    for name in sorted(names):
        values = {v for batch in batches for v in batch[name]}
        if len(values) == 1:
            constant[name] = values.pop()
    return constant


def constant_reward_message(constant: dict[str, float], batches: int) -> str:
    """The warning for `constant_rewards`' result (a non-empty one)."""
    named = ", ".join(f"{name} (always {value:g})" for name, value in constant.items())
    return (
        f"REWARD IS CONSTANT: over the first {batches} batches, every sample got the same reward from {named}. "
        "No sample is better than another, so the policy learns nothing from it: check the reward function, "
        "the data fields it reads, and its error counts (reward_errors/<fn>)."
    )
