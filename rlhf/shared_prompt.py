"""Response log-probs without the waste: logits only where a response token is predicted, and
each GRPO/RLVR prompt run once for its N samples (pure torch + transformers, no Ray/DeepSpeed).

Two layouts give the same (B, T) log-probs as `compute_token_logprobs(model(...).logits, ids)`
(rlhf/algos/losses.py) at the response positions, 0 elsewhere, so losses use them unchanged:

* ordinary rows (`response_logprobs`): one right-padded row per sample (rlhf/batch.py). The
  decoder body runs as usual, but the vocabulary projection runs only on the hidden states that
  predict a response token, in chunks: prompt logits over a 49k vocabulary are never built.
* shared prompt (`pack_shared_prompts` + `shared_prompt_logprobs`): the rows of a group share
  their prompt, so one packed row holds the prompt once, then each sample's response:

      packed row:  p0 p1 p2 | a0 a1 | b0 b1 b2 | pad
      position:     0  1  2 |  3  4 |  3  4  5 |  ..   (each response restarts after the prompt)

  A 4D mask (G, 1, L, L) lets a response token see the prompt and the earlier tokens of its own
  response only, so every response token sees exactly the context it has in its own row and
  its log-prob is the same (up to float rounding); the prompt's cost is paid once per group.

Models: decoder-only HF causal LMs whose logits are `lm_head(final hidden state)` (Llama, Qwen2,
Mistral, SmolLM2, ...), also wrapped by peft. The mask is made for the model's attention
implementation: boolean for sdpa (True = may attend), additive float for eager and flex
(sdpa measured fastest on CPU: bench/shared_prompt.py --attn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import cast

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024  # response tokens projected to the vocabulary at once
MASK_ALIGN = 8  # packed width rounded up to this: CUDA's memory-efficient SDPA wants aligned masks


# --------------------------------------------------------------------------- the model's two halves
def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning last_hidden_state, lm_head) of an HF causal LM (or a peft wrapper)."""
    config = model.config
    for field in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} post-processes its logits ({field}={getattr(config, field)}); "
                "response-only logits assume logits = lm_head(hidden) and would differ"
            )
    get_decoder, get_head = getattr(model, "get_decoder"), getattr(model, "get_output_embeddings")  # noqa: B009
    return cast(torch.nn.Module, get_decoder()), cast(torch.nn.Module, get_head())


def attention_implementation(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def mask_for_model(allowed: torch.Tensor, model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, L, L) mask the model's attention takes as-is: sdpa takes booleans (True =
    attend); eager and flex add the mask to the scores, so they get 0 / the dtype's minimum.
    Flash-attention kernels take no arbitrary mask at all."""
    impl = attention_implementation(model)
    if impl.startswith("flash"):
        raise ValueError(
            f"attn_implementation={impl!r} cannot take the shared-prompt 4D mask; load the model "
            "with attn_implementation='sdpa' (or 'eager')"
        )
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- log-probs at given positions
def _chunk_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    logits = head(hidden).float() / temperature  # (k, V), float32 as compute_token_logprobs does
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (k,)
    return cast(torch.Tensor, picked - torch.logsumexp(logits, dim=-1))  # (k,)


def logprobs_at(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    predict_at: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets[k] | context) for each k, where hidden state predict_at[k] (a flat index into
    the (B * T) positions) predicts targets[k]: (K,) float32.

    input_ids (B, T); attention_mask (B, T) 0/1 or a prepared (B, 1, T, T) mask; position_ids
    (B, T) or None. The head runs on chunks of `chunk_tokens` gathered hidden states; with grad
    enabled each chunk is checkpointed (its logits recomputed in backward), so at most one chunk's
    (chunk_tokens, V) logits exist at a time, in forward and in backward.
    """
    body, head = decoder_and_head(model)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, predict_at)  # (K, H)
    outs = []
    for start in range(0, picked.shape[0], chunk_tokens):
        h, t = picked[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            outs.append(checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(head, h, t, temperature))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs (B, T) aligned with input_ids, like compute_token_logprobs on the full logits,
    but computed only where response_mask is 1 (0 elsewhere). Ordinary right-padded rows."""
    rows, cols = _response_positions(response_mask)  # (K,), (K,)
    width = input_ids.shape[1]
    values = logprobs_at(
        model,
        input_ids,
        attention_mask,
        None,
        rows * width + cols - 1,
        input_ids[rows, cols],
        chunk_tokens,
        temperature,
    )  # (K,)
    return _scatter(values, rows, cols, input_ids.shape)


def _response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = response_mask.nonzero(as_tuple=True)  # row-major order
    if bool((cols == 0).any()):
        raise ValueError(
            f"response_mask is 1 at position 0 of row {int(rows[cols == 0][0])}: nothing predicts "
            "a row's first token, so a response must follow at least one prompt token"
        )
    return rows, cols


def _scatter(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    out = values.new_zeros(tuple(shape))  # (B, T)
    return out.index_put((rows, cols), values)  # differentiable: the loss's gradient reaches `values`


# --------------------------------------------------------------------------- shared-prompt packing
@dataclass
class SharedPromptPack:
    """Groups of rows packed one group per row. G groups, packed width L, K response tokens.

    input_ids (G, L); allowed (G, 1, L, L) bool, True where query position may attend key
    position; position_ids (G, L). For each response token k (in the original rows' row-major
    order): predict_at (K,) flat index into (G * L) of the hidden state that predicts it,
    targets (K,) its token id, rows / cols (K,) where it sits in the original (B, T) batch.
    """

    input_ids: torch.Tensor
    allowed: torch.Tensor
    position_ids: torch.Tensor
    predict_at: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    batch_shape: tuple[int, int]
    real_tokens: int  # positions that are not padding: the compute this layout costs

    def to(self, device: torch.device | str) -> SharedPromptPack:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        return SharedPromptPack(**moved)


def _prompt_lengths(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> list[int]:
    """Tokens before each row's first response token (the whole row if it has none): (B,)."""
    first = response_mask.float().argmax(-1)  # (B,) the first maximum: the first 1
    return torch.where(response_mask.bool().any(-1), first, attention_mask.sum(-1)).tolist()


def pack_shared_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    groups: list[list[int]],
    pad_id: int = 0,
) -> SharedPromptPack:
    """Pack rows of a right-padded batch (rlhf/batch.py) whose groups share a prompt.

    input_ids, attention_mask, response_mask: (B, T). groups: row indices of each group (every
    row exactly once, e.g. the N samples of a prompt). A row's prompt is everything before its
    first response token and must be the same (tokens and length) in every row of its group; its
    response is everything from there to the row's last real token (tokens inside it with
    response_mask 0, e.g. a tool's output, are kept as context and get log-prob 0).
    """
    input_ids, attention_mask, response_mask = input_ids.cpu(), attention_mask.cpu(), response_mask.cpu()
    B, T = input_ids.shape
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(B)):
        raise ValueError(f"groups must hold every row 0..{B - 1} exactly once; got rows {seen}")
    lengths = attention_mask.sum(-1).tolist()  # (B,) real tokens per row (right padding)
    first = _prompt_lengths(attention_mask, response_mask)
    layouts = []  # per group: (prompt_len, [(row, response_start_in_pack)], width)
    for g, rows in enumerate(groups):
        p = first[rows[0]]
        if p == 0:
            raise ValueError(f"row {rows[0]} (group {g}) has no prompt: its first token is a response token")
        for r in rows[1:]:
            if first[r] != p or not torch.equal(input_ids[r, :p], input_ids[rows[0], :p]):
                raise ValueError(
                    f"rows {rows[0]} and {r} of group {g} do not share a prompt "
                    f"(prompt lengths {p} and {first[r]}); only rows with the same prompt can be packed"
                )
        starts, offset = [], p
        for r in rows:
            starts.append(offset)
            offset += int(lengths[r]) - p
        layouts.append((p, starts, offset))
    L = -(-max(w for _, _, w in layouts) // MASK_ALIGN) * MASK_ALIGN
    G = len(groups)
    packed = torch.full((G, L), pad_id, dtype=input_ids.dtype)
    position_ids = torch.full((G, L), -1, dtype=torch.long)  # -1 marks padding until filled below
    segment = torch.full((G, L), -1, dtype=torch.long)  # 0 prompt, i + 1 response i, -1 padding
    packed_pos = torch.zeros(B, T, dtype=torch.long)  # where each original token sits in its pack
    for g, (rows, (p, starts, _width)) in enumerate(zip(groups, layouts)):
        packed[g, :p] = input_ids[rows[0], :p]
        position_ids[g, :p] = torch.arange(p)
        segment[g, :p] = 0
        packed_pos[rows, :p] = torch.arange(p)
        for i, (r, s) in enumerate(zip(rows, starts)):
            n = int(lengths[r]) - p
            packed[g, s : s + n] = input_ids[r, p : p + n]
            position_ids[g, s : s + n] = torch.arange(p, p + n)
            segment[g, s : s + n] = i + 1
            packed_pos[r, p : p + n] = torch.arange(s, s + n)
    # query q may see key k: causal in the packed order, and k is prompt or in q's own response.
    # A padding query (segment -1) sees the prompt and earlier padding: never an empty row, whose
    # softmax would be NaN and poison the gradients even though its output is never used.
    q_seg, k_seg = segment.unsqueeze(-1), segment.unsqueeze(-2)  # (G, L, 1), (G, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & ((k_seg == 0) | (k_seg == q_seg))  # (G, L, L)
    rows_k, cols_k = _response_positions(response_mask)
    group_of = torch.empty(B, dtype=torch.long)
    for g, rows in enumerate(groups):
        group_of[rows] = g
    predict_at = group_of[rows_k] * L + packed_pos[rows_k, cols_k - 1]
    return SharedPromptPack(
        input_ids=packed,
        allowed=allowed.unsqueeze(1),
        position_ids=position_ids.clamp(min=0),
        predict_at=predict_at,
        targets=input_ids[rows_k, cols_k],
        rows=rows_k,
        cols=cols_k,
        batch_shape=(B, T),
        real_tokens=int((segment >= 0).sum()),
    )


def shared_prompt_logprobs(
    model: torch.nn.Module,
    pack: SharedPromptPack,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs (B, T) in the original rows' layout (as response_logprobs) from one forward of
    the packed groups. The pack must be on the model's device (`pack.to(device)`); the result is
    on it too."""
    dtype = next(model.parameters()).dtype
    mask = mask_for_model(pack.allowed, model, dtype)
    values = logprobs_at(
        model, pack.input_ids, mask, pack.position_ids, pack.predict_at, pack.targets, chunk_tokens, temperature
    )  # (K,)
    return _scatter(values, pack.rows, pack.cols, pack.batch_shape)


def shared_prompt_values(model: torch.nn.Module, pack: SharedPromptPack) -> torch.Tensor:
    """A critic's values (B, T) float32 from one forward of the packed groups, in the original rows'
    layout and alignment (values[:, t] = the head's output at t - 1: the state before token t),
    at response positions only (0 elsewhere; GAE and the value loss read only those).

    model: an HF *ForTokenClassification with one label (base model, dropout, score head), as
    actors/critic.py loads. Its dropout (active in train mode) sees only the picked hidden states,
    so in train mode the values follow the same distribution as the unpacked forward's, not the
    same random draws; in eval mode (or with dropout 0) they are equal up to float rounding."""
    body = cast(torch.nn.Module, getattr(model, "base_model"))  # noqa: B009
    score = cast(torch.nn.Module, getattr(model, "score"))  # noqa: B009
    dropout = cast(torch.nn.Module, getattr(model, "dropout", torch.nn.Identity()))
    mask = mask_for_model(pack.allowed, model, next(model.parameters()).dtype)
    hidden = body(
        input_ids=pack.input_ids, attention_mask=mask, position_ids=pack.position_ids, use_cache=False
    ).last_hidden_state  # (G, L, H)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pack.predict_at)  # (K, H)
    values = score(dropout(picked))[:, 0].float()  # (K,)
    return _scatter(values, pack.rows, pack.cols, pack.batch_shape)


def consecutive_groups(num_rows: int, group_size: int) -> list[list[int]]:
    """Row indices of groups of `group_size` consecutive rows (n samples per prompt, in order)."""
    if group_size < 1 or num_rows % group_size:
        raise ValueError(f"{num_rows} rows do not split into groups of {group_size}")
    return [list(range(i, i + group_size)) for i in range(0, num_rows, group_size)]


def packed_lengths(attention_mask: torch.Tensor, response_mask: torch.Tensor, groups: list[list[int]]) -> list[int]:
    """Width of each group's packed row (its prompt once plus every response), padding excluded."""
    lengths, first = attention_mask.sum(-1).tolist(), _prompt_lengths(attention_mask, response_mask)
    return [int(first[g[0]]) + sum(int(lengths[r] - first[g[0]]) for r in g) for g in groups]


def group_micro_batches(
    attention_mask: torch.Tensor, response_mask: torch.Tensor, groups: list[list[int]], budget: int
) -> list[list[list[int]]]:
    """The groups of each micro-batch under a token budget (rlhf/batch.py's greedy fill, with a
    group's packed width as its length): a group is never split, since its responses need the
    prompt in the same row. Returns, per micro-batch, its groups' row indices."""
    plan = fill_under_budget(packed_lengths(attention_mask, response_mask, groups), budget)
    return [[groups[i] for i in micro] for micro in plan]


def fill_under_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """rlhf/batch.py's token_budget_micro_batches rule (longest first, fill while items x longest
    <= budget, a longer item alone), for packs; kept here so this module type-checks on its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for i in order:
        if plan and (len(plan[-1]) + 1) * max(lengths[plan[-1][0]], 1) <= budget:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


# --------------------------------------------------------------------------- finding and planning groups
# The trainer (actors/trainer.py) finds the rows that share a prompt by comparing prompt token ids,
# never by row order: the coordinator shuffles a step's samples before training, and rows may
# come from different prompts' samples in any order. A prompt is a row's tokens before its
# first response token; whatever follows (a response, tool output inside it) stays per row.


def prompt_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> list[list[int]]:
    """Row indices of each set of rows with the same prompt token ids, in order of each set's first
    row; a row without a response token (nothing to share) is a group of its own. (B, T) inputs."""
    firsts = _prompt_lengths(attention_mask, response_mask)
    has_response = response_mask.bool().any(-1).tolist()
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    groups: list[list[int]] = []
    for row, (p, shared) in enumerate(zip(firsts, has_response)):
        if not shared or p == 0:
            groups.append([row])
            continue
        key = tuple(input_ids[row, :p].tolist())
        if key not in by_prompt:
            by_prompt[key] = []
            groups.append(by_prompt[key])
        by_prompt[key].append(row)
    return groups


def tokens_saved(attention_mask: torch.Tensor, response_mask: torch.Tensor, groups: list[list[int]]) -> float:
    """Share (0..1) of the rows' real tokens that packing `groups` would not run: the repeats of
    each prompt."""
    total = int(attention_mask.sum())
    return 1.0 - sum(packed_lengths(attention_mask, response_mask, groups)) / total if total else 0.0


def split_group(
    group: list[int], attention_mask: torch.Tensor, response_mask: torch.Tensor, max_tokens: int
) -> list[list[int]]:
    """A group cut into consecutive subgroups whose packed width stays within max_tokens (a
    subgroup of one row may exceed it). Each subgroup still shares its prompt."""
    parts: list[list[int]] = [[]]
    for row in group:
        if parts[-1] and packed_lengths(attention_mask, response_mask, [parts[-1] + [row]])[0] > max_tokens:
            parts.append([])
        parts[-1].append(row)
    return parts


def shared_micro_batches(
    groups: list[list[int]],
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    micro_batch_size: int,
    budget: int | None,
) -> list[list[list[int]]]:
    """Micro-batches of packs: per micro-batch, the row indices of each packed row.

    budget None (trainer.micro_batch_size rows): the rows, group after group, cut into runs of
    micro_batch_size, so there are as many micro-batches as the plain path has; a group cut by
    a run's end becomes two packs. budget (trainer.micro_batch_tokens): groups wider than the
    budget are split into subgroups that fit, then packs are filled into micro-batches like
    rows are (rlhf/batch.py: packs x widest pack <= budget), a pack counting its real tokens.
    """
    if budget is None:
        order = [r for g in groups for r in g]
        plan = []
        for start in range(0, len(order), micro_batch_size):
            run = set(order[start : start + micro_batch_size])
            plan.append([kept for g in groups if (kept := [r for r in g if r in run])])
        return plan
    packs = [part for g in groups for part in split_group(g, attention_mask, response_mask, budget)]
    return group_micro_batches(attention_mask, response_mask, packs, budget)


def split_shared_micro_batches(
    plan: list[list[list[int]]], attention_mask: torch.Tensor, response_mask: torch.Tensor, count: int
) -> list[list[list[int]]]:
    """Split micro-batches until there are `count` (ranks must run equally many, see
    actors/trainer.py): the costliest (packs x widest pack) in halves of its packs, or, when every
    micro-batch is one pack, the pack with the most rows into two packs of the same prompt."""
    plan = [list(micro) for micro in plan]

    def cost(micro: list[list[int]]) -> int:
        return len(micro) * max(packed_lengths(attention_mask, response_mask, micro))

    while len(plan) < count:
        several = [m for m in plan if len(m) > 1]
        if several:
            k = plan.index(max(several, key=cost))
            micro = plan[k]
            plan[k : k + 1] = [micro[: len(micro) // 2], micro[len(micro) // 2 :]]
            continue
        k = max(range(len(plan)), key=lambda i: len(plan[i][0]))
        pack = plan[k][0]
        if len(pack) < 2:
            raise ValueError(f"cannot make {count} micro-batches of {sum(len(p) for m in plan for p in m)} rows")
        plan[k : k + 1] = [[pack[: len(pack) // 2]], [pack[len(pack) // 2 :]]]
    return plan


def shard_by_prompt(groups: list[list[int]], lengths: list[int], world_size: int, balance: bool) -> list[list[int]]:
    """Row indices for each rank, equal counts (+-1, the first ranks get the extra rows), keeping a
    prompt's rows on one rank where the counts allow (a group cut at a rank's capacity continues
    on the next rank). balance: groups longest (in tokens) first, each to the rank with the fewest
    tokens that has room (as rlhf/batch.py balances rows); else groups in order, rank after rank."""
    n = len(lengths)
    capacity = [n // world_size + (r < n % world_size) for r in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    order = sorted(groups, key=lambda g: -sum(lengths[i] for i in g)) if balance else groups
    for group in order:
        rows = list(group)
        while rows:
            open_ranks = [r for r in range(world_size) if len(parts[r]) < capacity[r]]
            rank = min(open_ranks, key=lambda r: (tokens[r], r)) if balance else open_ranks[0]
            take = rows[: capacity[rank] - len(parts[rank])]
            rows = rows[len(take) :]
            parts[rank] += take
            tokens[rank] += sum(lengths[i] for i in take)
    return parts
