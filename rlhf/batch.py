"""The batch type passed between the coordinator and the model roles.

A `Batch` is a dict of tensors that share the leading dimension B (samples). Token tensors are
(B, T) and right-padded: each row is the prompt tokens, then the response tokens, then padding.
Per-token values (log-probs, advantages, values) are aligned with the token they belong to:
`logprobs[b, t]` is log p(input_ids[b, t] | input_ids[b, :t]); position 0 has no prediction.

Right padding keeps position ids 0..T-1 correct for every real token in any HF causal LM, so no
role needs to pass position ids.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

TOKEN_FIELDS = ("input_ids", "attention_mask", "response_mask")


class Batch(dict):
    """dict[str, Tensor] whose values all have the same leading size B."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sizes = {k: v.shape[0] for k, v in self.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of samples: {sizes}")

    def __len__(self) -> int:  # number of samples, not of fields
        return next(iter(self.values())).shape[0] if super().__len__() else 0

    @property
    def num_tokens(self) -> int:
        return int(self["attention_mask"].sum())

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "Batch":
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Batch({k: v[index] for k, v in self.items()})

    def split(self, size: int) -> list["Batch"]:
        """Consecutive chunks of at most `size` samples."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def chunk(self, n: int) -> list["Batch"]:
        """n contiguous, nearly equal parts (for scattering over n ranks)."""
        bounds = torch.linspace(0, len(self), n + 1).round().long().tolist()
        return [self.select(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def trim(self) -> "Batch":
        """Drop trailing columns that are padding in every row (saves compute on short batches)."""
        width = int(self["attention_mask"].sum(-1).max()) if len(self) else 0
        return Batch({k: v[:, :width] if v.dim() >= 2 and k in self._token_keys() else v for k, v in self.items()})

    def _token_keys(self) -> set[str]:
        width = self["input_ids"].shape[1]
        return {k for k, v in self.items() if v.dim() >= 2 and v.shape[1] == width}

    @staticmethod
    def concat(batches: Iterable["Batch"], pad_values: dict[str, float] | None = None) -> "Batch":
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
    """Build a right-padded Batch from token lists.

    prompts[i], responses[i]: token ids of sample i. per_token[name][i] holds one float per
    response token (e.g. the rollout engine's log-probs) and is placed at the response positions.
    """
    per_token = per_token or {}
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, T = len(lengths), max(lengths, default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    response_mask = torch.zeros(B, T, dtype=torch.float32)  # (B, T)
    extra = {name: torch.zeros(B, T, dtype=torch.float32) for name in per_token}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n_p, n_r = len(p), len(r)
        input_ids[i, : n_p + n_r] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, : n_p + n_r] = 1
        response_mask[i, n_p : n_p + n_r] = 1.0
        for name, values in per_token.items():
            if len(values[i]) != n_r:
                raise ValueError(f"{name}[{i}] has {len(values[i])} values for {n_r} response tokens")
            extra[name][i, n_p : n_p + n_r] = torch.tensor(values[i], dtype=torch.float32)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, **extra)
