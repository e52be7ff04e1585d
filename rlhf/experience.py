"""Experience building: how prompts reach the engines and how their samples become a batch.

One place for each idea the RL loop, the evaluations and the benchmarks share:

- `format_prompt`: a data row's prompt text as the policy sees it (chat template or raw).
- `sampling_settings`: the engine's sampling settings, derived from the rollout config, for
  training samples, sampled evaluation or greedy evaluation; `sampling_seed` / `prompt_seed`
  derive the seeds that make a resumed run draw the same samples.
- `Sample`: one trajectory as a token sequence with a per-token `loss_mask` (1 on tokens the
  policy generated, 0 on the prompt and on anything between response segments, e.g. tool
  output or a user turn) and an explicit `group_id` (the samples one prompt's group compares).
  A single-turn sample is the prompt plus one response segment; a multi-turn one has several.
- `collate`: samples -> a right-padded `Batch` with `group_ids` (B,) next to the token tensors.

Pure: no Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import torch

from rlhf.batch import Batch, collate_sequences
from rlhf.config import RolloutConfig
from rlhf.data.chat import apply_chat_template

SamplingMode = Literal["train", "eval_sampled", "greedy"]
SEED_STRIDE = 1009  # seeds of neighbouring prompts are this far apart (vLLM adds the sample index)


# ----------------------------------------------------------------------------------- prompts
def format_prompt(tokenizer: Any, prompt: str, chat_template: Literal["tokenizer", "none"] = "tokenizer") -> str:
    """The prompt text the engines (and trainers) see: wrapped in the tokenizer's chat template,
    ending where the assistant speaks (data.chat_template = "tokenizer"), or as it is ("none")."""
    if chat_template == "tokenizer":
        return apply_chat_template(tokenizer, prompt)
    return prompt


# ----------------------------------------------------------------------------------- sampling
class SamplingSettings(TypedDict, total=False):
    """What a rollout engine takes (actors/rollout.py; vLLM SamplingParams of the same names)."""

    n: int  # samples per prompt
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str] | None
    seed: int | None  # the first prompt's; prompt i uses prompt_seed(seed, i)
    logprobs: int  # top-k log-probs besides the sampled token's (the engine asks for 0)


SAMPLING_KEYS = tuple(SamplingSettings.__annotations__)


def sampling_settings(
    rollout: RolloutConfig, mode: SamplingMode, step: int = 0, round_: int = 0, n: int | None = None
) -> SamplingSettings:
    """The engines' settings for one call, from the rollout config.

    "train": samples_per_prompt samples at `temperature` / `top_p`, seeded per step and refill
    round (`sampling_seed`). "eval_sampled": eval_samples samples at the training temperature
    with the fixed seed rollout.seed (the same draws at every evaluation). "greedy": one
    temperature-0 answer. `n` replaces the sample count (e.g. a preference eval that samples
    samples_per_prompt)."""
    stop = list(rollout.stop) or None
    if mode == "greedy":
        return {"n": n or 1, "temperature": 0.0, "max_tokens": rollout.max_new_tokens, "stop": stop}
    if mode == "train":
        count, seed = rollout.samples_per_prompt, sampling_seed(rollout.seed, step, round_)
    else:
        count, seed = rollout.eval_samples, rollout.seed
    return {
        "n": count if n is None else n,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "max_tokens": rollout.max_new_tokens,
        "stop": stop,
        "seed": seed,
    }


def sampling_seed(seed: int, step: int, round_: int) -> int:
    """A seed per step and refill round, not the engine's running RNG: a resumed run (new
    engines) then draws exactly the samples the uninterrupted run would have drawn."""
    return (seed * 1_000_003 + step * 101 + round_) % 2**31


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` of a call seeded `seed`: with one seed for the whole call,
    every prompt would draw the same random numbers. A shard starting at prompt k seeded
    prompt_seed(seed, k) gives every prompt the seed it has in the unsharded call."""
    return (seed + index * SEED_STRIDE) % 2**31


# ----------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One trajectory: its tokens (prompt first), which of them the policy generated, and its group.

    token_ids, loss_mask, logprobs: (L,) each, aligned per token. loss_mask is 1 on tokens the
    policy generated (the ones trained on), 0 on the prompt and on non-policy tokens between
    response segments; logprobs holds the sampler's log-prob of each policy token, 0.0 elsewhere.
    """

    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    group_id: int  # samples of one prompt share it; unique within a step
    text: str = ""  # the policy's text, what rewards score
    row: dict[str, Any] = field(default_factory=dict)  # the data row it answers (prompt, answer, ...)
    policy_version: int = 0  # RL updates behind the weights that generated it
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not len(self.token_ids) == len(self.loss_mask) == len(self.logprobs):
            raise ValueError(
                f"token_ids, loss_mask, logprobs disagree: {len(self.token_ids)}, "
                f"{len(self.loss_mask)}, {len(self.logprobs)} tokens"
            )

    @classmethod
    def from_segments(
        cls, segments: Sequence[tuple[Sequence[int], Sequence[float] | None]], group_id: int, **fields: Any
    ) -> Sample:
        """A sample from its segments in order: (token ids, log-probs) for a segment the policy
        generated (one log-prob per token), (token ids, None) for one it did not (the prompt,
        tool output, a user turn)."""
        tokens: list[int] = []
        mask: list[int] = []
        logprobs: list[float] = []
        for ids, lps in segments:
            if lps is not None and len(lps) != len(ids):
                raise ValueError(f"a policy segment of {len(ids)} tokens has {len(lps)} log-probs")
            tokens += ids
            mask += [0 if lps is None else 1] * len(ids)
            logprobs += [0.0] * len(ids) if lps is None else [float(x) for x in lps]
        return cls(tokens, mask, logprobs, group_id, **fields)

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.loss_mask)


def samples_from_generation(
    generated: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], first_group: int, policy_version: int
) -> list[Sample]:
    """An engine call's samples (actors/rollout.py: prompt_index, prompt_token_ids,
    response_token_ids, logprobs, text, finish_reason) as single-turn Samples. The samples of
    prompt i form group first_group + i: a step numbers its groups across refill rounds."""
    return [
        Sample.from_segments(
            [(g["prompt_token_ids"], None), (g["response_token_ids"], g["logprobs"])],
            group_id=first_group + g["prompt_index"],
            text=g["text"],
            row=rows[g["prompt_index"]],
            policy_version=policy_version,
            finish_reason=g.get("finish_reason"),
        )
        for g in generated
    ]


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Samples -> Batch: input_ids, attention_mask (B, T) long; response_mask (B, T) float, the
    loss mask (1 on policy tokens of every segment); rollout_logprobs (B, T) float at the tokens
    they belong to; group_ids (B,) long. Single-segment samples give exactly the tensors of
    `collate_samples(prompts, responses, pad_id, {"rollout_logprobs": ...})`, plus group_ids."""
    batch = collate_sequences(
        [s.token_ids for s in samples],
        [s.loss_mask for s in samples],
        pad_id,
        {"rollout_logprobs": [s.logprobs for s in samples]},
    )
    batch["group_ids"] = torch.tensor([s.group_id for s in samples], dtype=torch.long)  # (B,)
    return batch


# ----------------------------------------------------------------------------------- experience
@dataclass
class Experience:
    """A step's training data: the collated batch (with old / reference log-probs, values and
    advantages as the step needs them), its scores and what the metrics read."""

    batch: Batch  # see `collate`; + old_logprobs, ref_logprobs, old_values, advantages, returns
    scores: torch.Tensor  # (B,) combined reward per sample
    kl: torch.Tensor | None  # (B, T) KL of the sampled tokens to the reference, when computed
    staleness: list[int]  # per sample: updates between the weights that sampled it and these
