"""The `guess_feedback` environment: wrong answers get feedback and another turn.

With a row holding `secret` (an integer; `low`/`high` optional, default 1..100) it is a
number-guessing game; with a reasoning-gym row (`question`, numeric `answer`) the question is
asked. Each turn's last number is the guess: right ends the episode with reward 1; wrong is
answered with "Wrong, try again." or, with `hints`, "Higher." / "Lower."; after `max_guesses`
wrong guesses the episode ends with reward 0.
"""

from __future__ import annotations

from typing import Any

from rlhf.environments.base import Message, Observation, environment
from rlhf.rewards.verifiers import last_number


@environment("guess_feedback")
class GuessFeedback:
    """Answers "wrong, try again" (or higher/lower hints) until the guess is right or K turns."""

    def __init__(self, max_guesses: int = 4, hints: bool = True) -> None:
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be at least 1, got {max_guesses}")
        self.max_guesses, self.hints = max_guesses, hints
        self.target = 0.0
        self.guesses = 0

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.guesses = 0
        if "secret" in row:
            self.target = float(row["secret"])
            low, high = row.get("low", 1), row.get("high", 100)
            question = f"I am thinking of an integer between {low} and {high}. Guess it: reply with one number."
        else:
            self.target = float(str(row["answer"]).replace(",", ""))
            question = f"{row['question']}\n\nReply with just the final number."
        return [{"role": "user", "content": question}]

    def episode_metrics(self) -> dict[str, float]:
        """Per-episode figures the rollout reports (episodes/env/<name>)."""
        return {"guesses": float(self.guesses)}

    def step(self, policy_text: str) -> Observation:
        self.guesses += 1
        found = last_number(policy_text)
        guess = float(found.replace(",", "")) if found is not None else None
        if guess is not None and abs(guess - self.target) < 1e-9:
            return Observation("", reward=1.0, done=True)
        if self.guesses >= self.max_guesses:
            return Observation("", reward=0.0, done=True)
        if guess is None:
            return Observation("Please reply with a number. Try again.")
        if self.hints:
            return Observation("Higher." if guess < self.target else "Lower.")
        return Observation("Wrong, try again.")
