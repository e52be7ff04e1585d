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

The rollout worker (actors/episode_rollout.py) drives many episodes at once; one episode alone:

    ep = Episode(tokenizer, make_environment("calculator"), row, group_id, max_turns=4, max_tokens=1024)
    while not ep.done:
        ids, logprobs = engine.generate(ep.token_ids, max_tokens=min(per_turn, ep.remaining_tokens))
        ep.add_policy_turn(ids, logprobs)
    sample = ep.to_sample(policy_version=v)

Pure: no Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rlhf.environments.base import Environment, Message, Observation, safe_reset, safe_step
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
        reset: tuple[list[Message], str | None] | None = None,
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
        self._awaiting: tuple[list[int], str] | None = None  # the policy turn the environment answers next
        # `reset`: safe_reset(env, row) already run by the caller (the rollout runs it under a deadline)
        messages, error = safe_reset(env, row) if reset is None else reset
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
        text = self.take_policy_turn(token_ids, logprobs)
        if text is not None:
            self.answer(safe_step(self.env, text))

    def take_policy_turn(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> str | None:
        """First half of `add_policy_turn`: append the policy's tokens as sampled. Returns the
        turn's text for the environment (`safe_step(env, text)`, then `answer`), or None when the
        episode ended here (the turn was cut by the token budget). The rollout worker runs the
        environment step elsewhere, under a deadline, and decodes other episodes meanwhile."""
        if self.done:
            raise RuntimeError(f"the episode is over ({self.finish_reason}): no further turns")
        if self._awaiting is not None:
            raise RuntimeError("the previous policy turn has not been answered (call answer first)")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} sampled tokens but {len(logprobs)} log-probs")
        ids, lps = list(token_ids)[: self.remaining_tokens], [float(x) for x in logprobs][: self.remaining_tokens]
        cut = len(ids) < len(token_ids)
        self._append(ids, lps)
        self.turns += 1
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
        self.policy_texts.append(text)
        if cut:  # the turn was cut mid-way: the environment is not asked about half a turn
            self.turn_rewards.append(None)
            self._finish("token_budget")
            return None
        self._awaiting = (ids, text)
        return text

    def answer(self, observation: Observation) -> None:
        """Second half of `add_policy_turn`: the environment's (checked) answer to the last turn;
        appends its template delta unless the episode ends. An Observation with `error` set (a
        failed or timed-out step) ends the episode as an environment error."""
        if self._awaiting is None:
            raise RuntimeError("no policy turn is waiting for an answer")
        (ids, text), self._awaiting = self._awaiting, None
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
        try:
            delta = self._delta_ids(ids, text, observation.messages())
        except Exception as e:  # e.g. a template that refuses the observation's role: this episode only
            self._fail(f"the chat template could not render the observation: {type(e).__name__}: {e}"[:1000])
            return
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


# ----------------------------------------------------------------------------------- records
# What a rollout worker sends back per episode: plain data (lists, numbers, strings).
EPISODE_COUNTS = ("episodes/count", "episodes/errors", "episodes/timeouts", "episodes/delta_fallbacks")  # summed
EPISODE_METRICS_LIMIT = 16  # an environment's own per-episode metrics: at most this many keys


def episode_record(ep: Episode, prompt_index: int, sample_index: int, timed_out: bool = False) -> dict[str, Any]:
    """One finished episode as plain data: its segments (token ids, log-probs or None), the
    figures the metrics read, and the environment's own `episode_metrics()` when it has one."""
    return {
        "prompt_index": prompt_index,
        "sample_index": sample_index,
        "segments": [(list(ids), None if lps is None else list(lps)) for ids, lps in ep.segments],
        "text": ep.policy_texts[-1] if ep.policy_texts else "",
        "policy_texts": list(ep.policy_texts),
        "finish_reason": ep.finish_reason,
        "turns": ep.turns,
        "turn_rewards": list(ep.turn_rewards),
        "env_reward": ep.reward,
        "error": ep.error,
        "timed_out": timed_out,
        "delta_fallbacks": ep.delta_fallbacks,
        "env_metrics": {} if timed_out else environment_metrics(ep.env),
    }


def environment_metrics(env: Environment | None) -> dict[str, float]:
    """`env.episode_metrics()` (optional: e.g. the calculator's tool calls), finite numbers only;
    {} when the environment has none or it fails."""
    get = getattr(env, "episode_metrics", None)
    if get is None:
        return {}
    try:
        values = get()
        return {
            str(k): float(v)
            for k, v in list(values.items())[:EPISODE_METRICS_LIMIT]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
    except Exception:  # a user's environment: its metrics are optional, the episode stands
        return {}


def failed(record: dict[str, Any]) -> bool:
    """The environment failed or timed out in this episode (reset or a step)."""
    return record["error"] is not None


def samples_from_episodes(
    records: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    first_group: int,
    policy_version: int,
    isolated_group_start: int,
) -> list[Sample]:
    """Episode records (prompt-major) as Samples. Episodes of prompt i form group first_group + i.

    An episode the environment broke (error or timeout) is kept in place, so batch shapes hold,
    but not trained on: its loss mask is zeroed (the policy is not blamed for the environment),
    and it gets a group of its own (isolated_group_start + its position), so its return is no
    baseline for the others (a group of one has advantage 0). A reset that failed leaves no
    tokens: such an episode is one padding-like token (the first prompt's end), mask 0."""
    samples = []
    for position, r in enumerate(records):
        segments = r["segments"] or [([0], None)]
        broken = failed(r)
        if broken:
            segments = [(ids, None) for ids, _ in segments]
        samples.append(
            Sample.from_segments(
                segments,
                group_id=isolated_group_start + position if broken else first_group + r["prompt_index"],
                text=r["text"],
                row=rows[r["prompt_index"]],
                policy_version=policy_version,
                finish_reason=r["finish_reason"],
            )
        )
    return samples


def episode_metrics(records: Sequence[dict[str, Any]], prefix: str = "episodes/") -> dict[str, float]:
    """Per-step figures: errors and timeouts (counts), mean turns, the share of each finish
    reason, template-delta fallbacks (count), and the mean of each environment metric."""
    if not records:
        return {}
    n = len(records)
    out = {
        f"{prefix}count": float(n),
        f"{prefix}errors": float(sum(failed(r) for r in records)),
        f"{prefix}timeouts": float(sum(r["timed_out"] for r in records)),
        f"{prefix}turns_mean": sum(r["turns"] for r in records) / n,
        f"{prefix}delta_fallbacks": float(sum(r["delta_fallbacks"] for r in records)),
        f"{prefix}env_reward_mean": sum(r["env_reward"] for r in records) / n,
    }
    for reason in ("env_done", "max_turns", "token_budget", "env_error"):
        out[f"{prefix}finish/{reason}"] = sum(r["finish_reason"] == reason for r in records) / n
    keys = sorted({k for r in records for k in r["env_metrics"]})
    for k in keys:
        values = [r["env_metrics"][k] for r in records if k in r["env_metrics"]]
        out[f"{prefix}env/{k}"] = sum(values) / len(values)
    return out
