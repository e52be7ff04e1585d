"""The batch type passed between the coordinator and the model roles.

A `Batch` is a dict of tensors that share the leading dimension B (samples). Token tensors are
(B, T) and right-padded: each row is the prompt tokens, then the response tokens, then padding.
Per-token values (log-probs, advantages, values) are aligned with the token they belong to:
`logprobs[b, t]` is log p(input_ids[b, t] | input_ids[b, :t]); position 0 has no prediction.
`response_mask` is the loss mask: 1 on tokens the policy generated, 0 on prompt, padding and any
non-policy tokens between response segments (multi-turn). RL batches also carry `group_ids`
(B,) long: samples with the same id were drawn for the same prompt (rlhf/experience.py).

Right padding keeps position ids 0..T-1 correct for every real token in any HF causal LM, so no
role needs to pass position ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch

TOKEN_FIELDS = ("input_ids", "attention_mask", "response_mask")


class Batch(dict[str, torch.Tensor]):
    """dict[str, Tensor] whose values all have the same leading size B."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sizes = {k: v.shape[0] for k, v in self.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of samples: {sizes}")

    def __len__(self) -> int:  # number of samples, not of fields
        return next(iter(self.values())).shape[0] if super().__len__() else 0

    @property
    def num_tokens(self) -> int:
        return int(self["attention_mask"].sum())

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> Batch:
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Batch({k: v[index] for k, v in self.items()})

    def split(self, size: int) -> list[Batch]:
        """Consecutive chunks of at most `size` samples."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def chunk(self, n: int) -> list[Batch]:
        """n contiguous, nearly equal parts (for scattering over n ranks)."""
        bounds = torch.linspace(0, len(self), n + 1).round().long().tolist()
        return [self.select(slice(a, b)) for a, b in itertools.pairwise(bounds)]

    def sample_lengths(self, rows_per_sample: int = 1) -> list[int]:
        """Tokens per sample: the longest of its `rows_per_sample` consecutive rows (2 for the
        chosen/rejected rows of a preference pair, which must stay together)."""
        lengths = self["attention_mask"].sum(-1).view(-1, rows_per_sample)  # (B / r, r)
        return [int(x) for x in lengths.max(-1).values.tolist()]

    def shard(self, n: int, balance_tokens: bool = False, rows_per_sample: int = 1) -> tuple[list[Batch], torch.Tensor]:
        """n parts for n ranks with equal sample counts (+-1), and `order`, the rows they hold
        one part after the other: `out[order] = torch.cat(per_part_results)` restores the batch's
        row order. Contiguous parts (`chunk`), or with balance_tokens, parts with balanced token
        totals (`balance_across_ranks`)."""
        num_samples = len(self) // rows_per_sample
        if balance_tokens:
            samples = balance_across_ranks(self.sample_lengths(rows_per_sample), n)
        else:
            bounds = torch.linspace(0, num_samples, n + 1).round().long().tolist()
            samples = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        rows = [[rows_per_sample * s + k for s in part for k in range(rows_per_sample)] for part in samples]
        return [self.select(r) for r in rows], torch.tensor([i for r in rows for i in r], dtype=torch.long)

    def trim(self) -> Batch:
        """Drop trailing columns that are padding in every row (saves compute on short batches)."""
        width = int(self["attention_mask"].sum(-1).max()) if len(self) else 0
        return Batch({k: v[:, :width] if v.dim() >= 2 and k in self._token_keys() else v for k, v in self.items()})

    def _token_keys(self) -> set[str]:
        width = self["input_ids"].shape[1]
        return {k for k, v in self.items() if v.dim() >= 2 and v.shape[1] == width}

    @staticmethod
    def concat(batches: Iterable[Batch], pad_values: dict[str, float] | None = None) -> Batch:
        """Concatenate along B, right-padding token tensors of different widths."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        pad_values = pad_values or {}
        width = max(b["input_ids"].shape[1] for b in batches)
        out = {}
        for key in batches[0]:
            parts = []
            for b in batches:
                v = b[key]
                if v.dim() >= 2 and key in b._token_keys() and v.shape[1] < width:
                    pad = v.new_full((v.shape[0], width - v.shape[1], *v.shape[2:]), pad_values.get(key, 0))
                    v = torch.cat([v, pad], dim=1)
                parts.append(v)
            out[key] = torch.cat(parts)
        return Batch(out)


def collate_samples(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    per_token: dict[str, Sequence[Sequence[float]]] | None = None,
) -> Batch:
    """Build a right-padded Batch from prompt + one response per sample.

    prompts[i], responses[i]: token ids of sample i. per_token[name][i] holds one float per
    response token (e.g. the rollout engine's log-probs) and is placed at the response positions.
    (Samples with several response segments: `collate_sequences`, or rlhf/experience.py.)
    """
    per_token = per_token or {}
    for name, values in per_token.items():
        for i, (v, r) in enumerate(zip(values, responses)):
            if len(v) != len(r):
                raise ValueError(f"{name}[{i}] has {len(v)} values for {len(r)} response tokens")
    return collate_sequences(
        [list(p) + list(r) for p, r in zip(prompts, responses)],
        [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)],
        pad_id,
        {name: [[0.0] * len(p) + list(v) for p, v in zip(prompts, values)] for name, values in per_token.items()},
    )


def collate_sequences(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    pad_id: int,
    per_token: dict[str, Sequence[Sequence[float]]] | None = None,
) -> Batch:
    """Build a right-padded Batch from whole token sequences and their loss masks.

    token_ids[i]: sample i's tokens, prompt first; loss_masks[i] (same length): 1 on tokens the
    policy generated, 0 elsewhere, so a sample may hold several response segments with other
    tokens (tool output, user turns) between them. per_token[name][i]: one float per token of
    sample i, placed at its position. Returns input_ids, attention_mask (B, T) long,
    response_mask (B, T) float (the loss mask) and each per_token field (B, T) float.
    """
    per_token = per_token or {}
    lengths = [len(t) for t in token_ids]
    B, T = len(lengths), max(lengths, default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    response_mask = torch.zeros(B, T, dtype=torch.float32)  # (B, T)
    extra = {name: torch.zeros(B, T, dtype=torch.float32) for name in per_token}
    for i, (tokens, mask) in enumerate(zip(token_ids, loss_masks)):
        n = len(tokens)
        if len(mask) != n:
            raise ValueError(f"loss_masks[{i}] has {len(mask)} values for {n} tokens")
        input_ids[i, :n] = torch.tensor(list(tokens), dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, :n] = torch.tensor(list(mask), dtype=torch.float32)
        for name, values in per_token.items():
            if len(values[i]) != n:
                raise ValueError(f"{name}[{i}] has {len(values[i])} values for {n} tokens")
            extra[name][i, :n] = torch.tensor(list(values[i]), dtype=torch.float32)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, **extra)


# ------------------------------------------------------------------------- token-budget micro-batches
# A micro-batch costs about rows x its longest row (right-padded to that width after `trim`).
# Packing rows of similar length under a token budget, instead of a fixed row count, keeps that
# padded area close to the real token count. The loss is normalised by the global batch (see
# rlhf/algos/aggregation.py), so how rows are grouped changes the compute, never the update.


def token_budget_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices of each micro-batch: rows sorted longest first, each micro-batch filled while
    (its rows) x (its longest row) <= budget. A row longer than the budget goes alone.

    lengths: tokens per row (B,). Every row appears exactly once; micro-batches come longest
    first, and within one, rows keep the longest-first order. For rows sorted by length this
    greedy fill gives the fewest micro-batches of consecutive rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * max(lengths[groups[-1][0]], 1) <= budget:
            groups[-1].append(i)  # the group's first row is its longest
        else:
            groups.append([i])
    return groups


def split_micro_batches(groups: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Split micro-batches (in halves, the costliest by rows x longest row first) until there
    are `count` of them: ranks that run different numbers of micro-batches would disagree on
    DeepSpeed's collectives (ZeRO-3 gathers per forward, ZeRO-2/3 reduce per backward)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches of {sum(map(len, groups))} rows")
        g = max(splittable, key=lambda g: len(g) * max(lengths[i] for i in g))
        k = groups.index(g)
        groups[k : k + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def balance_across_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Row indices for each rank: equal counts (+-1, the first ranks get the extra rows) with
    token totals balanced greedily: rows longest first, each to the rank with the fewest tokens
    that still has room (rank totals end up within about one row's length of each other).
    Indices within a rank are in increasing order."""
    n = len(lengths)
    capacity = [n // world_size + (r < n % world_size) for r in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(world_size) if len(parts[r]) < capacity[r]), key=lambda r: (tokens[r], r))
        parts[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(p) for p in parts]
