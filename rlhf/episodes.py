"""One multi-turn episode's tokens, kept exactly: what the trainer sees is what the policy sampled.

The episode holds the token sequence the engine continues and the trainer trains on, as
segments (rlhf.experience.Sample.from_segments):

    prompt ids (0) | policy turn 1 (1, its sampling log-probs) | env delta 1 (0) | policy turn 2 (1) | ...

- The prompt is the environment's first messages through the chat template, with the
  generation prompt, tokenized once.
- A policy turn is appended as the engine sampled it: its token ids and log-probs, untouched
  (its text is decoded from those ids, so text and tokens cannot disagree).
- An observation is appended as the *delta* of the chat template: the conversation is rendered
  (as text) with and without the new message(s), and only the suffix is tokenized. So nothing
  before it is ever re-tokenized, and the policy is never trained on text it did not produce.
  The delta also carries whatever the template puts after the policy's turn (SmolLM2: the "\\n"
  after <|im_end|>, or <|im_end|>\\n itself when the turn was cut by max_tokens).
- Prefix property: the rendering with the new message must start with the previous rendering
  followed by exactly the policy's decoded tokens. Templates that rewrite earlier turns (e.g.
  strip reasoning) or a policy turn holding special tokens break it; then the observation is
  appended in the documented tag format instead, for the rest of the episode:

      <observation role="tool">RESULT</observation>\\n      (one per message; FALLBACK_FORMAT)

  and `delta_fallbacks` counts it.
- The episode ends when the environment says done, after `max_turns` policy turns, when the
  token budget `max_tokens` (prompt + all turns + observations) is used up (a policy turn is
  cut to what is left; an observation that does not fit ends the episode without it), or when
  the environment fails (safe_step: `errors`, `error`).

The rollout worker's loop (not wired yet):

    ep = Episode(tokenizer, make_environment("calculator"), row, group_id, max_turns=4, max_tokens=1024)
    while not ep.done:
        ids, logprobs = engine.generate(ep.token_ids, max_tokens=min(per_turn, ep.remaining_tokens))
        ep.add_policy_turn(ids, logprobs)
    sample = ep.to_sample(policy_version=v)

Pure: no Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf.environments.base import Environment, Message, safe_reset, safe_step
from rlhf.experience import Sample

FALLBACK_FORMAT = '<observation role="{role}">{content}</observation>\n'
Segment = tuple[list[int], list[float] | None]


class Episode:
    """The token bookkeeping of one episode against one environment (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        env: Environment,
        row: dict[str, Any],
        group_id: int,
        *,
        max_turns: int,
        max_tokens: int,
    ) -> None:
        if max_turns < 1 or max_tokens < 1:
            raise ValueError(f"max_turns and max_tokens must be positive, got {max_turns}, {max_tokens}")
        self.tokenizer, self.env, self.row, self.group_id = tokenizer, env, row, group_id
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.tools: list[dict[str, Any]] | None = getattr(env, "tools", None)  # for templates that render tools
        self.segments: list[Segment] = []
        self.length = 0  # tokens so far, all segments
        self.turns = 0  # policy turns taken
        self.turn_rewards: list[float | None] = []  # per policy turn, as the environment gave them
        self.policy_texts: list[str] = []
        self.errors = 0  # environment failures (0 or 1: a failure ends the episode)
        self.error: str | None = None
        self.delta_fallbacks = 0  # observations appended in FALLBACK_FORMAT
        self.done = False
        self.finish_reason: str | None = None  # env_done, max_turns, token_budget, env_error
        messages, error = safe_reset(env, row)
        self.messages: list[Message] = messages
        self._rendered: str | None = None  # template text the tokens stand for; None after a fallback
        self.prompt_ids: list[int] = []
        if error is not None:
            self._fail(error)
            return
        self._rendered = self._render(messages, generation_prompt=True)
        self.prompt_ids = prompt_ids = self._encode(self._rendered)
        if len(prompt_ids) >= max_tokens:
            self._append(prompt_ids[:max_tokens], None)
            self._finish("token_budget")
        else:
            self._append(prompt_ids, None)

    # ------------------------------------------------------------------------------- reading
    @property
    def token_ids(self) -> list[int]:
        """Every token so far (the engine's next prompt)."""
        return [t for ids, _ in self.segments for t in ids]

    @property
    def remaining_tokens(self) -> int:
        """Tokens the budget still allows (cap the next turn's max_tokens with it)."""
        return self.max_tokens - self.length

    @property
    def reward(self) -> float:
        """The sum of the rewards the environment gave (0 when it gave none)."""
        return sum(r for r in self.turn_rewards if r is not None)

    def to_sample(self, **fields: Any) -> Sample:
        """The episode as a Sample: loss mask 1 on the policy's tokens, 0 on prompt and observations.
        `text` is the last policy turn (what a final-answer verifier reads); `fields` go to Sample."""
        fields.setdefault("text", self.policy_texts[-1] if self.policy_texts else "")
        fields.setdefault("row", self.row)
        fields.setdefault("finish_reason", self.finish_reason)
        return Sample.from_segments(self.segments, self.group_id, **fields)

    # ------------------------------------------------------------------------------- a turn
    def add_policy_turn(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Append the policy's turn exactly as sampled, let the environment answer, append its delta."""
        if self.done:
            raise RuntimeError(f"the episode is over ({self.finish_reason}): no further turns")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} sampled tokens but {len(logprobs)} log-probs")
        ids, lps = list(token_ids)[: self.remaining_tokens], [float(x) for x in logprobs][: self.remaining_tokens]
        cut = len(ids) < len(token_ids)
        self._append(ids, lps)
        self.turns += 1
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.policy_texts.append(text)
        if cut:  # the turn was cut mid-way: the environment is not asked about half a turn
            self.turn_rewards.append(None)
            self._finish("token_budget")
            return
        observation = safe_step(self.env, text)
        self.turn_rewards.append(observation.reward)
        if observation.error is not None:
            self._fail(observation.error)
            return
        if observation.done:
            self._finish("env_done")
            return
        if self.turns >= self.max_turns:
            self._finish("max_turns")
            return
        delta = self._delta_ids(ids, text, observation.messages())
        if len(delta) >= self.remaining_tokens:  # no room for the observation and a policy token
            self._finish("token_budget")
            return
        self._append(delta, None)

    # ------------------------------------------------------------------------------- internals
    def _delta_ids(self, policy_ids: list[int], policy_text: str, new: list[Message]) -> list[int]:
        """Tokens of what the template adds after the policy's turn: its closing, the new
        messages, the next generation prompt. FALLBACK_FORMAT when the prefix property fails."""
        before = self._rendered
        self.messages = [*self.messages, {"role": "assistant", "content": policy_text}, *new]
        if before is not None:
            after = self._render(self.messages, generation_prompt=True)
            sampled = self.tokenizer.decode(policy_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if after.startswith(before + sampled):
                self._rendered = after
                return self._encode(after[len(before + sampled) :])
        self._rendered = None  # the template cannot be trusted for this conversation any more
        self.delta_fallbacks += 1
        return self._encode("".join(FALLBACK_FORMAT.format(role=m["role"], content=m["content"]) for m in new))

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _append(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.segments.append((ids, logprobs))
        self.length += len(ids)

    def _finish(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason

    def _fail(self, error: str) -> None:
        self.errors += 1
        self.error = error
        self._finish("env_error")
