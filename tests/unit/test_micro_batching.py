"""Token-budget micro-batching (rlhf/batch.py): packing, splitting to a count, balancing ranks."""

import random

import pytest
import torch

from rlhf.algos import aggregate_loss, compute_loss_normalizer, compute_token_logprobs
from rlhf.batch import balance_across_ranks, collate_samples, split_micro_batches, token_budget_micro_batches
from rlhf.config import TrainerConfig


def random_lengths(n, seed, lo=1, hi=300):
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def padded_area(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("budget", [1, 64, 500, 4096])
def test_budget_packing_covers_every_row_once_within_budget(budget):
    for seed in range(20):
        lengths = random_lengths(random.Random(seed).randint(0, 40), seed)
        groups = token_budget_micro_batches(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert g, "no empty micro-batch"
            assert len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1  # a lone row may exceed it
            assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)  # longest first


def test_a_row_longer_than_the_budget_goes_alone():
    groups = token_budget_micro_batches([10, 500, 20, 30], budget=100)
    assert [1] in groups
    assert sorted(map(len, groups)) == [1, 3]  # 30, 20, 10: 3 x 30 = 90 <= 100


def test_packing_is_greedy_and_minimal_for_sorted_runs():
    # 8 rows of 100 and 8 of 10 with budget 400: 4 + 4 rows of 100 would be 2 micro-batches of
    # 400; the short rows go 8 x 10 = 80 into one more (a fixed 4-row split would take 4).
    lengths = [100, 10] * 8
    groups = token_budget_micro_batches(lengths, 400)
    assert len(groups) == 3
    assert padded_area(groups, lengths) == sum(lengths)  # no padding at all


def test_packing_saves_padding_on_a_realistic_spread():
    rng = random.Random(0)
    lengths = [40 + int(rng.expovariate(1 / 120)) for _ in range(64)]  # prompt + a long-tailed response
    fixed = [list(range(i, i + 8)) for i in range(0, 64, 8)]
    budget = 8 * 160  # same peak area as 8 rows of a typical-long row
    packed = token_budget_micro_batches(lengths, budget)
    assert padded_area(packed, lengths) < padded_area(fixed, lengths)
    assert padded_area(packed, lengths) <= 1.25 * sum(lengths)


def test_split_reaches_the_count_keeping_every_row():
    lengths = random_lengths(12, 3)
    groups = token_budget_micro_batches(lengths, 2000)
    for count in range(len(groups), 13):
        split = split_micro_batches(groups, lengths, count)
        assert len(split) == count
        assert sorted(i for g in split for i in g) == list(range(12))
        assert all(g for g in split)
    assert split_micro_batches(groups, lengths, 1) == groups  # never merges
    with pytest.raises(ValueError, match="cannot make 13 micro-batches of 12 rows"):
        split_micro_batches(groups, lengths, 13)


def test_split_halves_the_costliest_micro_batch():
    lengths = [100, 100, 100, 100, 5, 5]
    assert split_micro_batches([[0, 1, 2, 3], [4, 5]], lengths, 3) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_balance_gives_equal_counts_and_token_totals_within_the_longest_row(world_size):
    for seed in range(200):
        n = random.Random(seed).randint(0, 33)
        lengths = random_lengths(n, seed, hi=random.Random(seed).choice([10, 300]))
        parts = balance_across_ranks(lengths, world_size)
        assert len(parts) == world_size
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert [len(p) for p in parts] == [len(c) for c in torch.arange(n).tensor_split(world_size)]
        totals = [sum(lengths[i] for i in p) for p in parts]
        if n:
            assert max(totals) - min(totals) <= max(lengths), (lengths, world_size, totals)
        assert all(p == sorted(p) for p in parts)


def test_balance_beats_contiguous_chunks_on_sorted_lengths():
    lengths = list(range(400, 0, -25))  # long rows first, as a length-sorted batch would be
    contiguous = [sum(lengths[:8]), sum(lengths[8:])]
    parts = balance_across_ranks(lengths, 2)
    totals = [sum(lengths[i] for i in p) for p in parts]
    assert max(contiguous) - min(contiguous) > 1000
    assert max(totals) - min(totals) <= 25


def variable_batch(n=10, seed=0, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    prompts = [torch.randint(3, 50, (draw(2, 9),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, 50, (draw(1, 30),), generator=g).tolist() for _ in range(n)]
    return collate_samples(prompts, responses, pad_id=pad_id)


def test_shard_contiguous_matches_chunk_and_order_restores_rows():
    batch = variable_batch(10)
    parts, order = batch.shard(3)
    for part, chunk in zip(parts, batch.chunk(3)):
        assert all(torch.equal(part[k], chunk[k]) for k in batch)
    parts, order = batch.shard(3, balance_tokens=True)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    restored = torch.empty_like(batch["input_ids"])
    restored[order] = torch.cat([p["input_ids"] for p in parts])
    assert torch.equal(restored, batch["input_ids"])


def test_shard_and_lengths_keep_pairs_together():
    batch = variable_batch(12)  # 6 pairs: rows 2i, 2i + 1
    lengths = batch["attention_mask"].sum(-1)
    assert batch.sample_lengths(2) == [max(int(lengths[2 * i]), int(lengths[2 * i + 1])) for i in range(6)]
    parts, order = batch.shard(2, balance_tokens=True, rows_per_sample=2)
    assert [len(p) for p in parts] == [6, 6]
    pairs = order.view(-1, 2)
    assert torch.equal(pairs[:, 1] - pairs[:, 0], torch.ones(6, dtype=torch.long))
    assert torch.equal(pairs[:, 0] % 2, torch.zeros(6, dtype=torch.long))


def test_config_field():
    assert TrainerConfig().micro_batch_tokens is None
    assert TrainerConfig(micro_batch_tokens=2048).micro_batch_tokens == 2048
    with pytest.raises(Exception, match="greater than or equal to 1"):
        TrainerConfig(micro_batch_tokens=0)


def test_packed_micro_batches_give_the_padded_loss_and_gradient():
    """The claim the trainers rely on, without Ray or DeepSpeed: with a global normaliser, summing
    micro-batch losses over length-sorted, trimmed, token-packed micro-batches gives the same loss
    and gradient as fixed-size micro-batches of consecutive rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    batch = variable_batch(10)
    batch["advantages"] = torch.linspace(-1, 1, 10).unsqueeze(1) * batch["response_mask"]
    norm = compute_loss_normalizer(batch["response_mask"], "token_mean")

    def loss_and_grad(groups):
        model.zero_grad()
        total = 0.0
        for rows in groups:
            micro = batch.select(rows).trim()
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            lp = compute_token_logprobs(logits, micro["input_ids"])
            loss = aggregate_loss(-lp * micro["advantages"], micro["response_mask"], global_normalizer=norm)
            loss.backward()
            total += float(loss.detach())
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    lengths = batch.sample_lengths()
    fixed_loss, fixed_grad = loss_and_grad([list(range(i, min(i + 4, 10))) for i in range(0, 10, 4)])
    packed = token_budget_micro_batches(lengths, budget=64)
    assert len(packed) > 3  # really regrouped
    packed_loss, packed_grad = loss_and_grad(packed)
    assert packed_loss == pytest.approx(fixed_loss, abs=1e-6)
    assert torch.allclose(packed_grad, fixed_grad, atol=1e-6), (packed_grad - fixed_grad).abs().max()
