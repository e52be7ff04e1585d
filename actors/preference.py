"""Preference learning without rollouts: reward-model training and DPO, driven from here.

    reward model: pairs -> RewardTrainerActor.train_step (Bradley-Terry) -> held-out pairwise accuracy -> HF folder
    DPO:          pairs -> token rows (chosen 2i, rejected 2i+1) -> reference log-probs of the pairs used, once -> PolicyActor.dpo_step

Both loops report a held-out preference accuracy before and after training (ties count one
half, so an untrained DPO policy, whose implicit rewards are all zero, scores 50%) and save the
trained model as a Hugging Face folder `run_dir/final` that later runs load by path (PPO's
`models.reward.path`, or a DPO policy to sample from). `trainer.global_batch_size` and
`micro_batch_size` count pairs in both loops.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer

from actors.group import ActorGroup, PlacementPlan
from rlhf.algos import compute_sequence_logprobs
from rlhf.batch import Batch, collate_samples
from rlhf.config import ConfigError, DataConfig, RunConfig
from rlhf.data.sources import load_preference_pairs
from rlhf.experience import format_prompt, sampling_settings
from rlhf.models import resolve_model_path
from rlhf.run_log import RunLogger, format_metrics

log = logging.getLogger("raylhf")


# ------------------------------------------------------------------------------ reward model
def run_reward_model(cfg: RunConfig, run_dir: Path) -> dict:
    from actors.reward import RewardTrainerActor

    train, heldout = _load_pairs(cfg.data)
    plan = PlacementPlan.create(cfg.resources, ["reward"])
    from actors.metrics import metric_sinks  # Ray dashboard metrics and wandb, as cfg.logging asks

    logger = RunLogger(
        run_dir,
        cfg.trainer.total_steps,
        cfg.logging.jsonl,
        cfg.logging.tensorboard,
        sinks=metric_sinks(cfg, "reward", run_dir),
    )
    group = None
    try:
        group = ActorGroup(
            RewardTrainerActor,
            "reward",
            plan,
            model=cfg.models.reward.model_dump(),
            trainer=cfg.trainer.model_dump(),
            seed=cfg.trainer.seed,
        )
        before = reward_model_eval(group, heldout)
        log.info("held-out before training: %s", format_metrics(before))
        logger.log(0, before)
        logger.restart_clock()  # s/step and the ETA count training steps, not set-up and evaluation
        for step, pairs in enumerate(pair_batches(len(train), cfg), start=1):
            parts = _chunk([train[i] for i in pairs], group.world_size)
            metrics = _merge(ray.get(group.async_scatter("train_step", parts, normalizer=float(len(pairs)))))
            logger.log(step, metrics)
            if step % cfg.logging.log_every == 0:
                log.info(logger.progress(step, metrics, ("rm_loss", "rm_accuracy")))
        after = reward_model_eval(group, heldout)
        logger.log(cfg.trainer.total_steps, after)
        log.info("held-out after training:  %s", format_metrics(after))
        final = ray.get(group.async_run("save_pretrained", str((run_dir / "final").resolve())))[0]
        log.info("reward model saved to %s", final)
        return {"before": before, "after": after, "steps": cfg.trainer.total_steps, "final": final}
    finally:
        logger.close()
        if group is not None:
            group.kill()
        plan.shutdown()


def reward_model_eval(group: ActorGroup, pairs: list[dict]) -> dict[str, float]:
    """Held-out pairwise accuracy: how often the model scores `chosen` above `rejected`."""
    if not pairs:
        return {}
    prompts = [p["prompt"] for p in pairs]
    texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    # Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0's answer is used.
    scores = ray.get(group.async_run("score", prompts + prompts, texts))[0]
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    return {
        "eval/pairwise_accuracy": preference_accuracy(chosen, rejected),
        "eval/score_margin": float((chosen - rejected).mean()),
    }


# --------------------------------------------------------------------------------------- DPO
def run_dpo(cfg: RunConfig, run_dir: Path) -> dict:
    from actors.policy import PolicyActor
    from actors.reference import ReferenceActor

    models = cfg.models
    tokenizer = AutoTokenizer.from_pretrained(models.policy.tokenizer or resolve_model_path(models.policy.path))
    train_pairs, heldout_pairs = _load_pairs(cfg.data)
    train, heldout = (
        tokenize_pairs(train_pairs, tokenizer, cfg.data),
        tokenize_pairs(heldout_pairs, tokenizer, cfg.data),
    )
    sample_eval = models.reward is not None  # also score fresh samples with the reward model
    plan = PlacementPlan.create(cfg.resources, ["policy", "reference"] + (["rollout", "reward"] if sample_eval else []))
    from actors.metrics import metric_sinks  # Ray dashboard metrics and wandb, as cfg.logging asks

    logger = RunLogger(
        run_dir,
        cfg.trainer.total_steps,
        cfg.logging.jsonl,
        cfg.logging.tensorboard,
        sinks=metric_sinks(cfg, "policy", run_dir),
    )
    common = {"trainer": cfg.trainer.model_dump(), "seed": cfg.trainer.seed}
    groups: list = []
    try:
        # The reference is frozen, so its log-probs of the pairs the steps will use are computed
        # once, up front (not of every train pair: a big dataset would cost more than the run);
        # then (unless samples need its log-probs for their KL) it is stopped, and the policy
        # trains with the role's cores and memory to itself.
        steps = list(pair_batches(len(train_pairs), cfg))
        used = [r for i in sorted({i for pairs in steps for i in pairs}) for r in (2 * i, 2 * i + 1)]
        reference = ActorGroup(
            ReferenceActor, "reference", plan, model=(models.reference or models.policy).model_dump(), **common
        )
        groups.append(reference)
        train["ref_logprobs"] = torch.full_like(train["response_mask"], float("nan"))  # NaN: never scored, never used
        train["ref_logprobs"][used] = ray.get(reference.async_run("compute_logprobs", train.select(used)))[0]
        log.info("reference: scored the %d train pairs the %d steps use", len(used) // 2, len(steps))
        if len(heldout):
            heldout["ref_logprobs"] = ray.get(reference.async_run("compute_logprobs", heldout))[0]
        if not sample_eval:
            reference.kill()
        policy = ActorGroup(
            PolicyActor,
            "policy",
            plan,
            model=models.policy.model_dump(),
            algorithm=cfg.algorithm.model_dump(),
            **common,
        )
        groups.append(policy)
        samples = SampleEval(cfg, plan, tokenizer, policy, reference, heldout_pairs) if sample_eval else None
        groups += samples.groups if samples else []

        def evaluate() -> dict[str, float]:
            return preference_eval(policy, heldout, cfg.algorithm.dpo.beta, cfg.algorithm.dpo.logprob_reduction) | (
                samples() if samples else {}
            )

        before = evaluate()
        log.info("held-out before training: %s", format_metrics(before))
        logger.log(0, before)
        logger.restart_clock()  # s/step and the ETA count training steps, not set-up and evaluation
        for step, pairs in enumerate(steps, start=1):
            rows = [r for i in pairs for r in (2 * i, 2 * i + 1)]  # keep each pair's two rows together
            balance = cfg.trainer.micro_batch_tokens is not None  # token-balanced ranks when packing by tokens
            parts, _ = train.select(rows).shard(policy.world_size, balance, rows_per_sample=2)
            metrics = _merge(ray.get(policy.async_scatter("dpo_step", parts, normalizer=float(len(pairs)))))
            logger.log(step, metrics)
            if step % cfg.logging.log_every == 0:
                log.info(logger.progress(step, metrics, ("dpo_loss", "accuracy", "margin")))
        after = evaluate()
        logger.log(cfg.trainer.total_steps, after)
        log.info("held-out after training:  %s", format_metrics(after))
        final = ray.get(policy.async_run("save_pretrained", str((run_dir / "final").resolve())))[0]
        log.info("DPO policy saved to %s", final)
        return {"before": before, "after": after, "steps": cfg.trainer.total_steps, "final": final}
    finally:
        logger.close()
        for group in groups:
            group.kill()
        plan.shutdown()


def preference_eval(policy: ActorGroup, heldout: Batch, beta: float, reduction: str = "sum") -> dict[str, float]:
    """Held-out DPO metrics from the implicit reward beta * (log pi - log ref) of each response,
    on the sequence log-probs the loss trains (`reduction`: summed, or length-averaged for IPO)."""
    if not len(heldout):
        return {}
    logprobs = ray.get(policy.async_run("compute_logprobs", heldout))[0]  # (2P, T); all ranks join under ZeRO-3
    mask = heldout["response_mask"]
    reward = beta * compute_sequence_logprobs(logprobs - heldout["ref_logprobs"], mask, reduction)  # (2P,)
    chosen, rejected = reward[0::2], reward[1::2]
    return {
        "eval/preference_accuracy": preference_accuracy(chosen, rejected),
        "eval/reward_margin": float((chosen - rejected).mean()),
        # how far the policy moved, in nats per response token: DPO's implicit KL budget
        "eval/logratio_per_token": float(((logprobs - heldout["ref_logprobs"]) * mask).sum() / mask.sum()),
    }


class SampleEval:
    """What a DPO policy writes, not just how it ranks given texts: fresh samples for the held-out
    prompts (rollout.samples_per_prompt each, the distinct prompts of the held-out pairs), their
    mean reward-model score, and their KL to the reference, sum over tokens of
    log pi(y_t) - log ref(y_t) with y ~ pi (the k1 estimate, in nats per sample and per token)."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: PlacementPlan,
        tokenizer,
        policy: ActorGroup,
        reference: ActorGroup,
        pairs: list[dict],
    ):
        from actors.reward import RewardActor
        from actors.rollout import RolloutGroup

        self.cfg, self.tokenizer, self.policy, self.reference = cfg, tokenizer, policy, reference
        self.prompts = list(dict.fromkeys(p["prompt"] for p in pairs))[: max(cfg.data.eval_size, 1)]
        spec = cfg.models.policy
        self.rollout = RolloutGroup(
            plan,
            resolve_model_path(spec.path),
            None if spec.dtype == "auto" else spec.dtype,
            cfg.rollout,
            max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
        )
        self.reward = ActorGroup(
            RewardActor,
            "reward",
            plan,
            model=cfg.models.reward.model_dump(),
            trainer=cfg.trainer.model_dump(),
            seed=cfg.trainer.seed,
        )
        self.groups = [self.rollout, self.reward]

    def __call__(self) -> dict[str, float]:
        r, d = self.cfg.rollout, self.cfg.data
        self.rollout.sync_from(self.policy)  # the engines sample from the current policy
        texts = [format_prompt(self.tokenizer, p, d.chat_template) for p in self.prompts]
        # the fixed seed rollout.seed: the same draws before and after training
        sampling = sampling_settings(r, "eval_sampled", n=r.samples_per_prompt)
        samples = self.rollout.generate(texts, sampling, weights_from=self.policy)
        scores = ray.get(
            self.reward.async_run(
                "score", [self.prompts[s["prompt_index"]] for s in samples], [s["text"] for s in samples]
            )
        )[0]
        batch = collate_samples(
            [s["prompt_token_ids"] for s in samples],
            [s["response_token_ids"] for s in samples],
            self.tokenizer.pad_token_id,
            {"rollout_logprobs": [s["logprobs"] for s in samples]},
        )
        ref = ray.get(self.reference.async_run("compute_logprobs", batch))[0]
        mask = batch["response_mask"]
        kl = ((batch["rollout_logprobs"] - ref) * mask).sum(-1)  # (B,)
        return {
            "eval/sample_reward": float(scores.mean()),
            "eval/sample_kl": float(kl.mean()),
            "eval/sample_kl_per_token": float(kl.sum() / mask.sum()),
            "eval/sample_length": float(mask.sum(-1).float().mean()),
        }


def tokenize_pairs(pairs: list[dict], tokenizer, data: DataConfig) -> Batch:
    """Rows 2i / 2i+1: prompt i + chosen i / prompt i + rejected i, right-padded (rlhf/batch.py).

    The prompt is formatted as the policy sees it when sampling (chat template or raw); each
    response ends with the EOS token, as a sampled response would. Both are cut to
    data.max_prompt_len / max_response_len tokens (the prompt keeps its end, where the
    assistant's turn starts).
    """
    prompts, responses = [], []
    for pair in pairs:
        text = format_prompt(tokenizer, pair["prompt"], data.chat_template)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"][-data.max_prompt_len :]
        for key in ("chosen", "rejected"):
            response = tokenizer(pair[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompts.append(prompt)
            responses.append(response[: data.max_response_len])
    if not prompts:
        return Batch()
    return collate_samples(prompts, responses, tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------- shared
def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, tie: float = 1e-6) -> float:
    """Fraction of pairs with chosen > rejected; a tie (|difference| <= tie) counts one half,
    so a model that cannot tell the two apart scores 50%, not 0%."""
    diff = chosen.float() - rejected.float()
    return float(((diff > tie).float() + 0.5 * (diff.abs() <= tie).float()).mean())


def pair_batches(num_pairs: int, cfg: RunConfig):
    """total_steps lists of global_batch_size pair indices: seeded shuffles, epoch after epoch."""
    size, rng, order = cfg.trainer.global_batch_size, random.Random(cfg.data.seed), []
    if num_pairs < size:
        raise ConfigError(f"trainer.global_batch_size={size} pairs, but the data has only {num_pairs} train pairs")
    for _ in range(cfg.trainer.total_steps):
        while len(order) < size:
            epoch = list(range(num_pairs))
            rng.shuffle(epoch)
            order += epoch
        yield order[:size]
        order = order[size:]


def _load_pairs(data: DataConfig) -> tuple[list[dict], list[dict]]:
    train, heldout = load_preference_pairs(data, "train"), load_preference_pairs(data, "eval")
    log.info("data: %d train pairs, %d held-out pairs from %s", len(train), len(heldout), data.source)
    return train, heldout


def _chunk(items: list, n: int) -> list[list]:
    size = len(items) // n  # pair_batches yields global_batch_size, a multiple of the rank count
    return [items[i * size : (i + 1) * size] for i in range(n)]


def _merge(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Losses are per-rank shares of one total (summed); every other metric is averaged."""
    keys = per_rank[0]
    return {k: sum(m[k] for m in per_rank) / (1 if k.endswith("loss") else len(per_rank)) for k in keys}
