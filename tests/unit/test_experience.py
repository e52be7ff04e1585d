"""rlhf/experience.py: prompt formatting, sampling settings, samples with group ids and loss masks."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rlhf.batch import collate_samples
from rlhf.config import RolloutConfig
from rlhf.experience import (
    SAMPLING_KEYS,
    Sample,
    collate,
    format_prompt,
    prompt_seed,
    samples_from_generation,
    sampling_seed,
    sampling_settings,
)
from rlhf.models import CHATML_TEMPLATE


def test_format_prompt_templates_or_passes_through():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=CHATML_TEMPLATE)
    templated = format_prompt(tokenizer, "What is 2 + 3?", "tokenizer")
    assert "What is 2 + 3?" in templated and templated.endswith("<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "What is 2 + 3?", "none") == "What is 2 + 3?"


def test_sampling_settings_per_mode():
    r = RolloutConfig(samples_per_prompt=6, temperature=0.7, top_p=0.9, max_new_tokens=12, stop=["\n"], seed=5)
    train = sampling_settings(r, "train", step=3, round_=1)
    assert train == {
        "n": 6,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 12,
        "stop": ["\n"],
        "seed": sampling_seed(5, 3, 1),
    }
    assert sampling_settings(r, "train", step=3, round_=2)["seed"] != train["seed"]  # each refill its own draws
    sampled = sampling_settings(r.model_copy(update={"eval_samples": 3}), "eval_sampled")
    assert sampled == train | {"n": 3, "seed": 5}  # fixed seed: every evaluation draws alike
    assert sampling_settings(r, "greedy") == {"n": 1, "temperature": 0.0, "max_tokens": 12, "stop": ["\n"]}
    assert sampling_settings(RolloutConfig(), "greedy")["stop"] is None  # no stop strings: vLLM's None
    assert sampling_settings(r, "eval_sampled", n=6)["n"] == 6
    assert set(train) <= set(SAMPLING_KEYS)


def test_seeds_match_the_values_runs_were_recorded_with():
    # resumed runs and recorded benchmarks depend on these exact numbers
    assert sampling_seed(0, 1, 0) == 101
    assert sampling_seed(7, 2, 3) == (7 * 1_000_003 + 2 * 101 + 3) % 2**31
    assert prompt_seed(10, 3) == 10 + 3 * 1009
    assert prompt_seed(2**31 - 1, 1) == 1008
    # a shard starting at prompt k, seeded prompt_seed(s, k), gives prompt k + i the unsharded seed
    assert prompt_seed(prompt_seed(2**31 - 5, 4), 2) == prompt_seed(2**31 - 5, 6)


def generated(prompt_index, prompt, response, logprobs):
    return {
        "prompt_index": prompt_index,
        "prompt_token_ids": prompt,
        "response_token_ids": response,
        "logprobs": logprobs,
        "text": f"r{prompt_index}",
        "finish_reason": "length",
    }


def test_single_segment_collate_gives_todays_tensors_plus_group_ids():
    raw = [
        generated(0, [5, 6], [7, 8, 9], [-0.1, -0.2, -0.3]),
        generated(0, [5, 6], [10], [-0.4]),
        generated(1, [11], [12, 13], [-0.5, -0.6]),
    ]
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    samples = samples_from_generation(raw, rows, first_group=4, policy_version=2)
    assert [s.group_id for s in samples] == [4, 4, 5]
    assert [s.row for s in samples] == [rows[0], rows[0], rows[1]] and samples[0].policy_version == 2
    batch = collate(samples, pad_id=0)

    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 0, 0], [11, 12, 13, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]))
    assert torch.equal(batch["response_mask"], torch.tensor([[0.0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]))
    assert torch.equal(
        batch["rollout_logprobs"],
        torch.tensor([[0, 0, -0.1, -0.2, -0.3], [0, 0, -0.4, 0, 0], [0, -0.5, -0.6, 0, 0]]),
    )
    assert batch["group_ids"].dtype == torch.long and batch["group_ids"].tolist() == [4, 4, 5]
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.float32

    # and exactly what collate_samples (the prompt + response path) builds
    today = collate_samples(
        [g["prompt_token_ids"] for g in raw],
        [g["response_token_ids"] for g in raw],
        0,
        {"rollout_logprobs": [g["logprobs"] for g in raw]},
    )
    assert set(batch) == set(today) | {"group_ids"}
    for key, value in today.items():
        assert value.dtype == batch[key].dtype and torch.equal(value, batch[key]), key


def test_two_segment_sample_masks_and_logprob_alignment():
    """Prompt, a policy turn, tool output, another policy turn: only the policy's tokens are in
    the loss mask, and each log-prob sits on the token it belongs to."""
    prompt, turn1, tool, turn2 = [1, 2, 3], [4, 5], [6, 7, 8], [9, 10]
    sample = Sample.from_segments(
        [(prompt, None), (turn1, [-1.0, -2.0]), (tool, None), (turn2, [-3.0, -4.0])], group_id=7
    )
    assert sample.token_ids == prompt + turn1 + tool + turn2
    assert sample.loss_mask == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert sample.num_policy_tokens == 4
    single = Sample.from_segments([([1], None), ([2], [-0.5])], group_id=8)
    batch = collate([sample, single], pad_id=0)

    mask, lps, ids = batch["response_mask"], batch["rollout_logprobs"], batch["input_ids"]
    assert mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert batch["attention_mask"][0].tolist() == [1] * 10  # tool tokens are real tokens, attended to
    policy = mask[0].bool()
    assert ids[0][policy].tolist() == turn1 + turn2
    assert lps[0][policy].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert lps[0][~policy].abs().sum() == 0
    assert mask[1].tolist() == [0, 1] + [0] * 8 and lps[1, 1] == -0.5
    assert batch["group_ids"].tolist() == [7, 8]
    # per-token fields computed later (old log-probs, advantages) share the layout: a masked sum
    # over the batch counts exactly the policy tokens of both segments
    assert int(mask.sum()) == sample.num_policy_tokens + single.num_policy_tokens


def test_sample_rejects_misaligned_fields():
    with pytest.raises(ValueError, match="log-probs"):
        Sample.from_segments([([1, 2], [-0.1])], group_id=0)
    with pytest.raises(ValueError, match="disagree"):
        Sample([1, 2], [0, 1], [0.0], group_id=0)


def test_group_ids_survive_selection_and_sharding():
    samples = [
        Sample.from_segments([([1], None), ([2] * (i + 1), [-0.1] * (i + 1))], group_id=i // 2) for i in range(6)
    ]
    batch = collate(samples, pad_id=0)
    order = torch.tensor([5, 0, 3])
    assert batch.select(order)["group_ids"].tolist() == [2, 0, 1]
    parts, rows = batch.shard(2, balance_tokens=True)
    assert torch.cat([p["group_ids"] for p in parts]).tolist() == batch["group_ids"][rows].tolist()
    assert batch.select([0, 1]).trim()["group_ids"].tolist() == [0, 0]
