"""Learning evidence for preference learning on the real runtime (local Ray, DeepSpeed, vLLM on CPU).

1. Reward model: all-MiniLM-L6-v2 with a fresh scalar head learns, from a few hundred IMDB
   pairs, to score a positive review above a negative one on held-out pairs (chance: 50%).
2. DPO: a tiny causal LM (random weights, BPE tokenizer trained on IMDB train text) learns a
   preference for positive reviews that carries over to held-out pairs: its implicit reward
   beta * log(pi / ref) ranks held-out chosen above rejected. Before training pi == ref, every
   implicit reward is 0 and accuracy is exactly 50% (ties count one half).
3. PPO (critic + GAE, KL penalty to the reference) against the reward model of test 1 raises the
   reward of fresh greedy samples on held-out prompts, and the KL to the reference stays bounded.
   The policy is a tiny random model too: SmolLM2-135M is ~1000x the compute and would not fit
   the CI budget on two cores; recipes/configs/ppo.yaml runs the real thing.

Thresholds sit below what the runs reach (see the report printed by each test) with room for
seed noise, and well above chance.
"""

import json

import pytest

from rlhf.config import validate_config
from rlhf.data.imdb import imdb_reviews
from tests.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.integration

MIN_RM_ACCURACY = 0.85
MIN_DPO_ACCURACY = 0.70
MAX_PPO_KL = 3.0  # nats per token (k1); measured max 1.5 after 40 steps, still growing slowly


def config(tmp_path, name: str, models: dict, algorithm: dict, trainer: dict, data: dict, cpus: dict, **sections):
    return validate_config(
        {
            "models": models,
            "data": {"source": "imdb", **data},
            "algorithm": algorithm,
            "trainer": {"zero_stage": 0, "scheduler": "constant", **trainer},
            # two cores for everything: fractional shares, each phase still uses all cores in turn
            "resources": {role: {"cpus_per_actor": c} for role, c in cpus.items()},
            "logging": {"dir": str(tmp_path), "run_name": name, "tensorboard": False, "log_every": 5},
            **sections,
        }
    )


@pytest.fixture(scope="module")
def imdb_tiny_lm(tmp_path_factory):
    """Random 2-layer Qwen2 whose tokenizer knows IMDB words (train split only)."""
    texts = [r["text"] for r in imdb_reviews("train")[:3000]]
    return build_tiny_causal_lm(
        tmp_path_factory.mktemp("tiny-imdb") / "model",
        texts,
        vocab_size=2048,
        hidden=64,
        layers=2,
        initializer_range=0.02,
    )


@pytest.fixture(scope="module")
def reward_model_result(ray_cluster, tmp_path_factory):
    from actors.launch import run

    tmp_path = tmp_path_factory.mktemp("reward-model")
    cfg = config(
        tmp_path,
        "rm",
        {"reward": {"path": "all-minilm-l6-v2", "dtype": "float32"}},
        {"name": "reward_model"},
        # 640 pairs, one epoch; lr 3e-4 with half the steps reached only 72%
        # linear decay: the same run at a constant lr ended anywhere in 79-88%
        {
            "lr": 2e-4,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "total_steps": 40,
            "scheduler": "linear",
            "warmup_steps": 2,
        },
        {"train_size": 640, "eval_size": 100},
        {"reward": 0.5},
    )
    return run(cfg)


def test_reward_model_learns_sentiment_preference(reward_model_result):
    before = reward_model_result["before"]["eval/pairwise_accuracy"]
    after = reward_model_result["after"]["eval/pairwise_accuracy"]
    print(f"reward model held-out pairwise accuracy: {before:.1%} -> {after:.1%}")
    assert after >= MIN_RM_ACCURACY, (before, after)
    assert reward_model_result["after"]["eval/score_margin"] > 0


def test_dpo_learns_preference_that_generalises(ray_cluster, imdb_tiny_lm, tmp_path):
    from actors.launch import run

    cfg = config(
        tmp_path,
        "dpo",
        {"policy": {"path": imdb_tiny_lm, "dtype": "float32"}},
        {"name": "dpo", "dpo": {"beta": 0.1}},
        # one epoch over 2048 pairs; 1024 pairs reached exactly 70%: too close to the bar
        {"lr": 3e-3, "global_batch_size": 32, "micro_batch_size": 16, "total_steps": 64},
        {"train_size": 2048, "eval_size": 200, "max_prompt_len": 32, "max_response_len": 64},
        {"policy": 0.5, "reference": 0.5},
    )
    result = run(cfg)
    before, after = result["before"]["eval/preference_accuracy"], result["after"]["eval/preference_accuracy"]
    print(f"DPO held-out preference accuracy: {before:.1%} -> {after:.1%}")
    assert before == pytest.approx(0.5, abs=0.05)  # pi == ref: every implicit reward is ~0
    assert after >= MIN_DPO_ACCURACY, (before, after)
    assert result["after"]["eval/reward_margin"] > 0


def test_dpo_samples_are_scored_by_the_judges(ray_cluster, reward_model_result, imdb_tiny_lm, tmp_path):
    """With a reward model, DPO's evaluation samples the policy; eval.judges score those samples too
    (not only the reward model), and every evaluation's samples are written with their scores."""
    from actors.launch import run

    cfg = config(
        tmp_path,
        "dpo-judged",
        {
            "policy": {"path": imdb_tiny_lm, "dtype": "float32"},
            "reward": {"path": reward_model_result["final_path"], "dtype": "float32"},
        },
        {"name": "dpo", "dpo": {"beta": 0.1}},
        {"lr": 3e-3, "global_batch_size": 8, "micro_batch_size": 8, "total_steps": 2},
        {"train_size": 64, "eval_size": 16, "max_prompt_len": 32, "max_response_len": 32},
        {r: 0.25 for r in ("policy", "reference", "reward", "rollout")},
        rollout={"samples_per_prompt": 4, "max_new_tokens": 16},
        eval={"judges": ["lexicon_sentiment"]},
    )
    result = run(cfg)
    for when in ("before", "after"):
        vader = result[when]["eval/sampled/judge/lexicon_sentiment"]
        assert -1.0 <= vader <= 1.0 and result[when]["eval/sampled/judge_errors/lexicon_sentiment"] == 0
    for updates in (0, 2):
        lines = (tmp_path / "dpo-judged" / "samples" / f"eval-{updates:05d}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        prompts = {r["prompt"] for r in records}
        assert len(records) == 4 * len(prompts) and all(r["mode"] == "sampled" for r in records)
        assert all("lexicon_sentiment" in r["judges"] and "model" in r["rewards"] for r in records)


def test_ppo_with_critic_raises_reward_model_score(ray_cluster, reward_model_result, imdb_tiny_lm, tmp_path):
    from actors.launch import run

    tiny = {"path": imdb_tiny_lm, "dtype": "float32"}
    cfg = config(
        tmp_path,
        "ppo",
        {"policy": tiny, "critic": tiny, "reward": {"path": reward_model_result["final_path"], "dtype": "float32"}},
        {"name": "ppo", "advantage": "gae", "kl": {"coef": 0.02, "estimator": "k1", "mode": "reward"}},
        # 10 steps at lr 1e-3 did not move the held-out reward; 40 at 3e-3 do
        {"lr": 3e-3, "critic_lr": 1e-3, "global_batch_size": 32, "micro_batch_size": 16, "total_steps": 40},
        {"train_size": 512, "eval_size": 32, "max_prompt_len": 32, "chat_template": "none"},
        {r: 0.25 for r in ("policy", "reference", "critic", "reward", "rollout")},
        rollout={"prompts_per_step": 16, "samples_per_prompt": 4, "max_new_tokens": 24},
    )
    result = run(cfg)
    before, after = result["before"]["eval/reward_mean"], result["after"]["eval/reward_mean"]
    steps = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    kls = [s["kl"] for s in steps if "kl" in s]
    print(
        f"PPO held-out reward (greedy, fresh samples): {before:.3f} -> {after:.3f}; "
        f"KL to reference per step: {', '.join(f'{k:.4f}' for k in kls)}"
    )
    assert len(kls) == cfg.trainer.total_steps
    assert after > before, (before, after)
    assert max(kls) < MAX_PPO_KL, kls
