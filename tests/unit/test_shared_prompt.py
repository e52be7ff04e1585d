"""Shared-prompt packing and response-only logits (rlhf/shared_prompt.py) against today's path:
`compute_token_logprobs(model(...).logits)` on one row per sample, on real (tiny, random) Llama
and Qwen2 models: equal log-probs, GRPO loss and every parameter's gradient."""

import pytest
import torch

from rlhf.algos import (
    compute_grpo_advantages,
    compute_kl,
    compute_loss_normalizer,
    compute_policy_loss,
    compute_token_logprobs,
    contiguous_group_ids,
    kl_loss,
)
from rlhf.batch import collate_samples
from rlhf.shared_prompt import (
    consecutive_groups,
    group_micro_batches,
    pack_shared_prompts,
    packed_lengths,
    prompt_groups,
    response_logprobs,
    shard_by_prompt,
    shared_micro_batches,
    shared_prompt_logprobs,
    shared_prompt_values,
    split_group,
    split_shared_micro_batches,
    tokens_saved,
)

TOL = 1e-5  # fp32: the paths differ only in summation order


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_cls(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def grouped_batch(spec, seed: int = 0, vocab: int = 211):
    """Rows of groups sharing a prompt. spec: per group (prompt length, [response lengths])."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, groups = [], [], []
    for prompt_len, response_lens in spec:
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        groups.append(list(range(len(prompts), len(prompts) + len(response_lens))))
        for n in response_lens:
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (n,), generator=g).tolist())
    return collate_samples(prompts, responses, pad_id=0), groups


# groups of different prompt lengths and sizes, ragged responses (so rows and packs are padded)
RAGGED = [(7, [3, 9, 1]), (2, [5, 5]), (12, [4, 2, 8, 6]), (5, [11])]


def full_logprobs(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return compute_token_logprobs(logits, batch["input_ids"]) * batch["response_mask"]


def grpo_loss(logprobs, batch, normalizer=None):
    """PPO-clip surrogate on GRPO advantages plus a k3 KL term, as the GRPO loop computes it."""
    mask = batch["response_mask"]
    old = logprobs.detach() + batch["old_shift"]  # a behaviour policy near the current one
    loss, _ = compute_policy_loss(logprobs, old, batch["advantages"], mask, global_normalizer=normalizer)
    ref = logprobs.detach() - 0.1 * mask
    return loss + 0.1 * kl_loss(compute_kl(logprobs, ref, "k3", mask), mask, global_normalizer=normalizer)


def with_advantages(batch, group_size: int):
    scores = torch.linspace(-1, 1, len(batch)).roll(3)
    group_ids = contiguous_group_ids(len(batch), group_size)
    batch["advantages"] = compute_grpo_advantages(scores, group_ids).unsqueeze(-1) * batch["response_mask"]
    mask = batch["response_mask"]
    batch["old_shift"] = 0.3 * torch.sin(torch.arange(mask.numel()).view(mask.shape).float()) * mask  # some ratios clip
    return batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, tol=TOL):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")])
def test_shared_prompt_logprobs_loss_and_grads_equal_unshared(family, attn):
    model = tiny_model(family, attn)
    spec = [(6, [4, 9, 2, 7]), (3, [5, 1, 8, 8]), (10, [2, 6, 3, 4])]  # GRPO: 4 samples per prompt
    batch, groups = grouped_batch(spec)
    batch = with_advantages(batch, 4)

    ref_lp = full_logprobs(model, batch)
    ref_loss = grpo_loss(ref_lp, batch)
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)

    pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["response_mask"], groups)
    lp = shared_prompt_logprobs(model, pack, chunk_tokens=16)
    loss = grpo_loss(lp, batch)
    loss.backward()

    assert lp.shape == ref_lp.shape
    torch.testing.assert_close(lp, ref_lp, atol=TOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=0)
    assert_grads_close(grads(model), ref_grads)
    assert pack.real_tokens < int(batch["attention_mask"].sum())  # each prompt ran once, not 4 times


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_response_only_chunked_logits_equal_full_logits(chunk_tokens):
    model = tiny_model("qwen2")
    batch, _ = grouped_batch(RAGGED)
    batch = with_advantages(batch, 1)
    ref_lp = full_logprobs(model, batch)
    grpo_loss(ref_lp, batch).backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)

    lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], chunk_tokens)
    grpo_loss(lp, batch).backward()
    torch.testing.assert_close(lp, ref_lp, atol=TOL, rtol=0)
    assert_grads_close(grads(model), ref_grads)
    assert (lp[batch["response_mask"] == 0] == 0).all()


def test_ragged_groups_padding_and_temperature_without_grad():
    """Groups of different prompt lengths and sizes in one pack, under no_grad (the reference
    role's path) and at a sampling temperature."""
    model = tiny_model("llama")
    batch, groups = grouped_batch(RAGGED, seed=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = compute_token_logprobs(logits, batch["input_ids"], temperature=0.7) * batch["response_mask"]
        pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["response_mask"], groups)
        shared = shared_prompt_logprobs(model, pack, chunk_tokens=5, temperature=0.7)
        plain = response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], chunk_tokens=5, temperature=0.7
        )
    torch.testing.assert_close(shared, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(plain, ref, atol=TOL, rtol=0)
    assert pack.input_ids.shape[1] % 8 == 0 and pack.input_ids.shape[0] == len(RAGGED)


def test_tokens_inside_a_response_outside_the_loss_mask_stay_context():
    """A multi-turn row (a tool's output inside the response, mask 0) keeps those tokens as
    context for the later response tokens, and gives them log-prob 0."""
    model = tiny_model("llama")
    batch, groups = grouped_batch([(4, [9, 7]), (6, [8, 3, 10])], seed=5)
    batch["response_mask"][0, 6:9] = 0  # row 0: response tokens 2..4 are an environment's
    batch["response_mask"][3, 8:10] = 0
    ref = full_logprobs(model, batch)
    pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["response_mask"], groups)
    torch.testing.assert_close(shared_prompt_logprobs(model, pack), ref, atol=TOL, rtol=0)


def test_pack_layout_mask_and_positions():
    batch, groups = grouped_batch([(3, [2, 3])])
    pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["response_mask"], groups)
    ids = batch["input_ids"]
    assert pack.input_ids[0, :8].tolist() == ids[0, :5].tolist() + ids[1, 3:6].tolist()
    assert pack.position_ids[0, :8].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    allowed = pack.allowed[0, 0, :8, :8].int()
    assert allowed[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # response a: prompt + itself
    assert allowed[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]  # response b: prompt + itself, not a
    assert allowed[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # the prompt: causal
    assert pack.allowed[0, 0].any(-1).all()  # padding queries see something: no NaN softmax rows
    # response token b0 (row 1, col 3) is predicted by the last prompt token, b1 by b0
    k = [i for i, (r, c) in enumerate(zip(pack.rows.tolist(), pack.cols.tolist())) if r == 1]
    assert pack.predict_at[k].tolist() == [2, 5, 6]
    assert packed_lengths(batch["attention_mask"], batch["response_mask"], groups) == [8]


def test_token_budget_micro_batches_of_whole_groups_give_the_full_batch_update():
    """Groups packed into micro-batches under a token budget, the loss globally normalised: the
    summed micro-batch losses and gradients equal the unshared full batch's."""
    model = tiny_model("qwen2")
    batch, groups = grouped_batch([(5, [3, 8]), (9, [2, 2]), (3, [7, 1]), (4, [6, 6])], seed=7)
    batch = with_advantages(batch, 2)
    normalizer = compute_loss_normalizer(batch["response_mask"], "token_mean")
    ref_loss = grpo_loss(full_logprobs(model, batch), batch, normalizer)
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)

    plan = group_micro_batches(batch["attention_mask"], batch["response_mask"], groups, budget=30)
    assert len(plan) > 1 and sorted(r for micro in plan for g in micro for r in g) == list(range(len(batch)))
    total = 0.0
    for micro_groups in plan:
        rows = [r for g in micro_groups for r in g]
        micro = batch.select(rows).trim()
        local = [[rows.index(r) for r in g] for g in micro_groups]
        pack = pack_shared_prompts(micro["input_ids"], micro["attention_mask"], micro["response_mask"], local)
        loss = grpo_loss(shared_prompt_logprobs(model, pack), micro, normalizer)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(ref_loss.detach()), abs=TOL)
    assert_grads_close(grads(model), ref_grads)


def test_bad_groups_get_clear_errors():
    batch, groups = grouped_batch([(4, [2, 3]), (4, [2])])
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with pytest.raises(ValueError, match="do not share a prompt"):
        pack_shared_prompts(*args, [[0, 1, 2]])
    with pytest.raises(ValueError, match="exactly once"):
        pack_shared_prompts(*args, [[0, 1]])
    bad = batch["response_mask"].clone()
    bad[2, 0] = 1
    with pytest.raises(ValueError, match="row 2"):
        pack_shared_prompts(batch["input_ids"], batch["attention_mask"], bad, groups)
    with pytest.raises(ValueError, match="groups of 2"):
        consecutive_groups(3, 2)
    assert consecutive_groups(4, 2) == [[0, 1], [2, 3]]


# ------------------------------------------------------------------ finding and planning groups
def shuffled(spec, seed=1):
    batch, groups = grouped_batch(spec, seed=seed)
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    where = {int(old): new for new, old in enumerate(order)}
    return batch.select(order), [sorted(where[r] for r in g) for g in groups]


def test_prompt_groups_are_found_by_prompt_ids_not_row_order():
    batch, groups = shuffled([(5, [3, 8, 2]), (9, [2, 2]), (5, [7]), (4, [6, 6, 1])])
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    # the third prompt has the first's length but other tokens: its own group
    assert sorted(map(sorted, prompt_groups(*args))) == sorted(groups)
    # same tokens as another prompt's start but a longer prompt: not the same prompt
    batch2, _ = grouped_batch([(3, [2, 2])])
    ids = torch.cat([batch2["input_ids"][:1, :3], torch.tensor([[7, 9, 9]])], 1)  # prompt p0 p1 p2 + response 7
    longer = collate_samples([ids[0, :4].tolist(), ids[0, :3].tolist()], [[9, 9], [7, 9, 9]], pad_id=0)
    assert prompt_groups(longer["input_ids"], longer["attention_mask"], longer["response_mask"]) == [[0], [1]]
    # a row without a response shares nothing
    no_response = collate_samples([[4, 5], [4, 5]], [[], [6]], pad_id=0)
    assert prompt_groups(*(no_response[k] for k in ("input_ids", "attention_mask", "response_mask"))) == [[0], [1]]


def test_tokens_saved_counts_the_repeated_prompts():
    batch, groups = grouped_batch([(10, [2, 2, 2, 2])])
    args = (batch["attention_mask"], batch["response_mask"])
    assert tokens_saved(*args, groups) == pytest.approx(30 / 48)  # 4 x (10 + 2) tokens, 10 + 8 run
    assert tokens_saved(*args, [[0], [1], [2], [3]]) == 0.0


def test_fixed_row_micro_batches_keep_groups_together_and_the_count():
    batch, groups = shuffled([(5, [3, 8]), (9, [2, 2]), (3, [7, 1]), (4, [6, 6])])
    groups = prompt_groups(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    plan = shared_micro_batches(groups, batch["attention_mask"], batch["response_mask"], 4, None)
    assert [sum(map(len, micro)) for micro in plan] == [4, 4]  # as many micro-batches as 8 rows / 4
    assert all(len(micro) == 2 for micro in plan)  # each micro-batch: 2 whole groups, 2 packs
    # a micro-batch size that cuts a group: the group becomes two packs, rows all kept
    plan3 = shared_micro_batches(groups, batch["attention_mask"], batch["response_mask"], 3, None)
    assert [sum(map(len, micro)) for micro in plan3] == [3, 3, 2]
    assert sorted(r for m in plan3 for p in m for r in p) == list(range(8))


def test_token_budget_splits_wide_groups_and_counts_real_tokens():
    batch, groups = grouped_batch([(20, [10, 10, 10, 10]), (4, [2, 2])])
    attn, resp = batch["attention_mask"], batch["response_mask"]
    assert split_group(groups[0], attn, resp, 45) == [[0, 1], [2, 3]]  # 20 + 10 + 10 = 40 each
    plan = shared_micro_batches(groups, attn, resp, 99, budget=45)
    assert sorted(r for m in plan for p in m for r in p) == list(range(6))
    for micro in plan:
        assert len(micro) * max(packed_lengths(attn, resp, micro)) <= 45
    # ranks: split to a larger count, whole micro-batches first, then packs into packs of one prompt
    more = split_shared_micro_batches(plan, attn, resp, 5)
    assert len(more) == 5 and sorted(r for m in more for p in m for r in p) == list(range(6))
    with pytest.raises(ValueError, match="cannot make"):
        split_shared_micro_batches(plan, attn, resp, 7)


@pytest.mark.parametrize("balance", [False, True])
def test_shard_by_prompt_keeps_groups_on_one_rank(balance):
    groups = [[0, 3, 5, 6], [1, 2, 4, 7], [8, 9, 10, 11]]
    lengths = [10] * 8 + [30] * 4
    parts = shard_by_prompt(groups, lengths, 3, balance)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(map(sorted, parts)) == sorted(map(sorted, groups))
    # counts that cut a group: equal shares (+-1) still, every row once
    parts = shard_by_prompt([[0, 1, 2], [3, 4, 5], [6, 7, 8]], [5] * 9, 2, balance)
    assert [len(p) for p in parts] == [5, 4] and sorted(r for p in parts for r in p) == list(range(9))


def test_critic_values_from_packs_equal_the_unpacked_values_and_gradients():
    """A token-classification critic (actors/critic.py): values[:, t] = head(hidden at t - 1)."""
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    config = Qwen2Config(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        classifier_dropout=0.0,  # train mode, but no random draws: the two layouts must agree exactly
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    critic = Qwen2ForTokenClassification(config).float().train()
    batch, groups = shuffled([(6, [4, 9, 2]), (3, [5, 1]), (10, [2, 6, 3, 4])])
    mask = batch["response_mask"]
    out = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]
    plain = torch.nn.functional.pad(out[:, :-1], (1, 0)) * mask
    ((plain - 0.5) ** 2 * mask).sum().backward()
    ref_grads = grads(critic)
    critic.zero_grad(set_to_none=True)

    pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], mask, groups)
    values = shared_prompt_values(critic, pack)
    ((values - 0.5) ** 2 * mask).sum().backward()
    torch.testing.assert_close(values, plain, atol=TOL, rtol=0)
    assert_grads_close(grads(critic), ref_grads)
