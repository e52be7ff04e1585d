"""Training on episodes: no gradient through environment tokens, broken episodes not trained on,
the per-step episode figures. Pure (no Ray): a tiny HF model and the loss the trainer uses."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos import compute_grpo_advantages
from rlhf.algos.losses import compute_policy_loss, compute_token_logprobs
from rlhf.episodes import episode_metrics, samples_from_episodes
from rlhf.experience import collate

# prompt | policy turn 1 | env delta | policy turn 2 | env delta | policy turn 3
SEGMENTS = [
    ([5, 6, 7], None),
    ([8, 9], [-0.5, -0.7]),
    ([10, 11, 12], None),
    ([13], [-0.2]),
    ([14], None),
    ([15, 2], [-1.0, -0.1]),
]


def record(prompt_index: int, reward: float, error: str | None = None, **kw: object) -> dict:
    return {
        "prompt_index": prompt_index,
        "sample_index": 0,
        "segments": SEGMENTS,
        "text": "42",
        "finish_reason": "env_error" if error else "env_done",
        "turns": 3,
        "env_reward": reward,
        "error": error,
        "timed_out": False,
        "delta_fallbacks": 0,
        "env_metrics": {"tool_calls": 2.0},
    } | kw


def tiny_model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).float()


def test_environment_tokens_get_no_gradient_and_change_no_loss() -> None:
    samples = samples_from_episodes([record(0, 1.0), record(0, 0.0)], [{}], 0, 0, isolated_group_start=100)
    batch = collate(samples, pad_id=0)  # input_ids, response_mask (B, T)
    mask = batch["response_mask"]
    assert mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1]
    model = tiny_model()
    logits = model(batch["input_ids"]).logits[:, :-1]  # (B, T-1, V): predicts tokens 1..T-1
    token_lp = compute_token_logprobs(logits, batch["input_ids"][:, 1:])  # (B, T-1)
    logprobs = torch.cat([torch.zeros(2, 1), token_lp], dim=1)  # aligned with input_ids (B, T)
    logprobs.retain_grad()
    adv = compute_grpo_advantages(torch.tensor([1.0, 0.0]), batch["group_ids"])[:, None].expand_as(mask)  # (B, T)
    old = logprobs.detach()  # on-policy: ratio 1, nothing clipped, so every sampled token has a gradient
    loss, _ = compute_policy_loss(logprobs, old, adv, mask)
    loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[mask == 0] == 0)  # prompt and environment tokens: exactly no gradient
    assert torch.all(grad[mask == 1] != 0)  # every sampled token: some
    # advantages at environment positions change nothing
    noisy = adv.clone()
    noisy[mask == 0] = 1e6
    again, _ = compute_policy_loss(logprobs.detach(), old, noisy, mask)
    assert torch.equal(again, loss.detach())


def test_broken_episodes_are_kept_in_place_but_not_trained_on() -> None:
    records = [
        record(0, 1.0),
        record(0, 0.0, error="step raised RuntimeError: x"),
        record(0, 0.0),
        record(1, 1.0, segments=[]),
    ]
    records[3]["error"] = "reset raised ValueError: y"
    samples = samples_from_episodes(
        records, [{"p": 0}, {"p": 1}], first_group=4, policy_version=2, isolated_group_start=100
    )
    assert [s.group_id for s in samples] == [4, 101, 4, 103]  # broken: a group of one each
    assert [s.num_policy_tokens for s in samples] == [5, 0, 5, 0]
    assert samples[1].token_ids == [t for ids, _ in SEGMENTS for t in ids]  # shape kept
    assert samples[3].token_ids == [0] and samples[3].loss_mask == [0]  # nothing to train on
    # GRPO: the healthy group's baseline ignores the broken episode; broken ones get advantage 0
    adv = compute_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([s.group_id for s in samples]))
    assert adv[1] == 0 and adv[3] == 0 and adv[0] > 0 > adv[2]
    assert samples[0].row == {"p": 0} and samples[0].policy_version == 2 and samples[0].text == "42"


def test_episode_metrics_count_errors_timeouts_and_average_the_rest() -> None:
    records = [
        record(0, 1.0),
        record(0, 0.0, error="timed out", timed_out=True, env_metrics={}, turns=1),
        record(1, 0.5, finish_reason="max_turns", env_metrics={"tool_calls": 0.0}),
    ]
    m = episode_metrics(records)
    assert m["episodes/count"] == 3 and m["episodes/errors"] == 1 and m["episodes/timeouts"] == 1
    assert m["episodes/turns_mean"] == pytest.approx(7 / 3)
    assert m["episodes/env_reward_mean"] == pytest.approx(0.5)
    assert m["episodes/finish/env_error"] == pytest.approx(1 / 3)
    assert m["episodes/finish/max_turns"] == pytest.approx(1 / 3)
    assert m["episodes/env/tool_calls"] == pytest.approx(1.0)  # over the episodes that report it
    assert episode_metrics([]) == {}


def test_gae_over_an_episode_skips_environment_tokens() -> None:
    """PPO: GAE over an episode equals GAE over its policy tokens alone; environment tokens get 0."""
    from rlhf.algos import compute_advantages

    batch = collate(samples_from_episodes([record(0, 1.0)], [{}], 0, 0, isolated_group_start=100), pad_id=0)
    mask = batch["response_mask"]  # (1, T)
    torch.manual_seed(0)
    values = torch.randn(mask.shape)
    adv, _ = compute_advantages("gae", torch.tensor([1.0]), mask, values=values, gamma=1.0, lam=0.9)
    policy = mask[0].bool()
    compact, _ = compute_advantages(
        "gae", torch.tensor([1.0]), torch.ones(1, int(policy.sum())), values=values[:, policy], gamma=1.0, lam=0.9
    )
    assert torch.all(adv[0, ~policy] == 0)
    assert torch.allclose(adv[0, policy], compact[0])
