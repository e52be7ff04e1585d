"""Preference learning without rollouts: reward-model training and DPO, driven from here.

    reward model: pairs -> RewardTrainerActor.train_step (Bradley-Terry) -> held-out pairwise accuracy -> HF folder
    DPO:          pairs -> token rows (chosen 2i, rejected 2i+1) -> reference log-probs of the pairs used, once -> PolicyActor.dpo_step

Both are training loops for the shared driver (actors/driver.py: checkpoints, resume, logging,
export). Both report a held-out preference accuracy before and after training (ties count one
half, so an untrained DPO policy, whose implicit rewards are all zero, scores 50%) and save the
trained model as a Hugging Face folder `run_dir/final` that later runs load by path (PPO's
`models.reward.path`, or a DPO policy to sample from). `trainer.global_batch_size` and
`micro_batch_size` count pairs in both loops.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from actors.group import ActorGroup, PlacementPlan, ray_get
from rlhf.algos import compute_sequence_logprobs
from rlhf.batch import Batch, collate_samples
from rlhf.config import ConfigError, DataConfig, RunConfig
from rlhf.data.sources import load_preference_pairs
from rlhf.evaluation.loop import HeldOutJudging
from rlhf.experience import format_prompt, sampling_settings
from rlhf.models import resolve_model_path

log = logging.getLogger("raylhf")


# ------------------------------------------------------------------------------ reward model
class RewardModelLoop:
    """Reward-model training (Bradley-Terry on pairs) as a training loop for the driver."""

    progress_keys = ("rm_loss", "rm_accuracy")
    sink_role = "reward"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.timeout_s = cfg.trainer.step_timeout_s
        self.plan = self.group = None

    def setup(self) -> None:
        from actors.reward import RewardTrainerActor

        cfg = self.cfg
        self.train, self.heldout = _load_pairs(cfg.data)
        self.steps = list(pair_batches(len(self.train), cfg))
        self.plan = PlacementPlan.create(cfg.resources, ["reward"])
        self.group = ActorGroup(
            RewardTrainerActor,
            "reward",
            self.plan,
            model=cfg.models.reward.model_dump(),
            trainer=cfg.trainer.model_dump(),
            seed=cfg.trainer.seed,
        )

    def step(self, step: int) -> dict[str, float]:
        pairs = self.steps[step - 1]
        parts = _chunk([self.train[i] for i in pairs], self.group.world_size)
        refs = self.group.async_scatter("train_step", parts, normalizer=float(len(pairs)))
        return _merge(ray_get(self.timeout_s, reward=refs))

    def evaluate(self) -> dict[str, float]:
        return reward_model_eval(self.group, self.heldout, self.timeout_s)

    def save_state(self, folder: Path) -> dict[str, Any]:
        ray_get(self.timeout_s, reward=self.group.async_run("save_checkpoint", str(folder / "reward")))
        return {}

    def load_state(self, folder: Path, state: dict[str, Any]) -> None:
        ray_get(self.timeout_s, reward=self.group.async_run("load_checkpoint", str(folder / "reward")))

    def export(self, path: Path) -> str:
        return ray_get(self.timeout_s, reward=self.group.async_run("save_pretrained", str(path)))[0]

    def dead_actors(self) -> list[str]:
        return [f"reward rank {r}" for r in self.group.dead_ranks()] if self.group else []

    def shutdown(self) -> None:
        _shutdown([self.group], self.plan)


def reward_model_eval(group: ActorGroup, pairs: list[dict], timeout_s: float) -> dict[str, float]:
    """Held-out pairwise accuracy: how often the model scores `chosen` above `rejected`."""
    if not pairs:
        return {}
    prompts = [p["prompt"] for p in pairs]
    texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    # Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0's answer is used.
    scores = ray_get(timeout_s, reward=group.async_run("score", prompts + prompts, texts))[0]
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    return {
        "eval/pairwise_accuracy": preference_accuracy(chosen, rejected),
        "eval/score_margin": float((chosen - rejected).mean()),
    }


# --------------------------------------------------------------------------------------- DPO
class DPOLoop:
    """DPO as a training loop for the driver. The reference is frozen, so its log-probs of the
    pairs the steps will use are computed once, in setup (not of every train pair: a big dataset
    would cost more than the run); then, unless samples need its log-probs for their KL, it is
    stopped and the policy trains with the role's cores and memory to itself. A resumed run
    computes them again, on the same pairs with the same frozen weights."""

    progress_keys = ("dpo_loss", "accuracy", "margin")
    sink_role = "policy"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.timeout_s = cfg.trainer.step_timeout_s
        self.plan, self.groups = None, []
        self.policy = self.samples = None
        self.done = 0  # optimizer steps behind the policy's weights: names the eval's samples file

    def setup(self) -> None:
        from actors.reference import AdaptersOffReference, ReferenceActor, reference_is_policy_without_adapters

        cfg, models = self.cfg, self.cfg.models
        tokenizer = AutoTokenizer.from_pretrained(models.policy.tokenizer or resolve_model_path(models.policy.path))
        train_pairs, heldout_pairs = _load_pairs(cfg.data)
        self.train = tokenize_pairs(train_pairs, tokenizer, cfg.data)
        self.heldout = tokenize_pairs(heldout_pairs, tokenizer, cfg.data)
        self.steps = list(pair_batches(len(train_pairs), cfg))
        sample_eval = models.reward is not None  # also score fresh samples with the reward model
        adapters_off = reference_is_policy_without_adapters(models)  # LoRA: no reference process
        roles = ["policy"] + ([] if adapters_off else ["reference"]) + (["rollout", "reward"] if sample_eval else [])
        self.plan = PlacementPlan.create(cfg.resources, roles)
        common = {"trainer": cfg.trainer.model_dump(), "seed": cfg.trainer.seed}
        if adapters_off:  # before any update, the policy with its adapters off is the reference
            reference = AdaptersOffReference(self._start_policy(common))
        else:
            reference = ActorGroup(
                ReferenceActor, "reference", self.plan, model=(models.reference or models.policy).model_dump(), **common
            )
            self.groups.append(reference)
        used = [r for i in sorted({i for pairs in self.steps for i in pairs}) for r in (2 * i, 2 * i + 1)]
        train = self.train
        train["ref_logprobs"] = torch.full_like(train["response_mask"], float("nan"))  # NaN: never scored, never used
        refs = reference.async_run("compute_logprobs", train.select(used))
        train["ref_logprobs"][used] = ray_get(self.timeout_s, reference=refs)[0]
        log.info("reference: scored the %d train pairs the %d steps use", len(used) // 2, len(self.steps))
        if len(self.heldout):
            refs = reference.async_run("compute_logprobs", self.heldout)
            self.heldout["ref_logprobs"] = ray_get(self.timeout_s, reference=refs)[0]
        if not sample_eval and not adapters_off:
            reference.kill()
            self.groups.remove(reference)
        if self.policy is None:
            self._start_policy(common)
        if sample_eval:
            self.samples = SampleEval(cfg, self.plan, tokenizer, self.policy, reference, heldout_pairs)
            self.groups += self.samples.groups

    def _start_policy(self, common: dict) -> ActorGroup:
        from actors.policy import PolicyActor

        models = self.cfg.models
        self.policy = ActorGroup(
            PolicyActor,
            "policy",
            self.plan,
            model=models.policy.model_dump(),
            algorithm=self.cfg.algorithm.model_dump(),
            **common,
        )
        self.groups.append(self.policy)
        return self.policy

    def step(self, step: int) -> dict[str, float]:
        pairs, self.done = self.steps[step - 1], step
        rows = [r for i in pairs for r in (2 * i, 2 * i + 1)]  # keep each pair's two rows together
        balance = self.cfg.trainer.micro_batch_tokens is not None  # token-balanced ranks when packing by tokens
        parts, _ = self.train.select(rows).shard(self.policy.world_size, balance, rows_per_sample=2)
        refs = self.policy.async_scatter("dpo_step", parts, normalizer=float(len(pairs)))
        return _merge(ray_get(self.timeout_s, policy=refs))

    def evaluate(self) -> dict[str, float]:
        dpo = self.cfg.algorithm.dpo
        out = preference_eval(self.policy, self.heldout, dpo.beta, dpo.logprob_reduction, self.timeout_s)
        return out | (self.samples(self.done) if self.samples else {})

    def save_state(self, folder: Path) -> dict[str, Any]:
        ray_get(self.timeout_s, policy=self.policy.async_run("save_checkpoint", str(folder / "policy")))
        return {}

    def load_state(self, folder: Path, state: dict[str, Any]) -> None:
        ray_get(self.timeout_s, policy=self.policy.async_run("load_checkpoint", str(folder / "policy")))
        self.done = int(state["step"])  # the driver's state: the step this checkpoint ends

    def export(self, path: Path) -> str:
        return ray_get(self.timeout_s, policy=self.policy.async_run("save_pretrained", str(path)))[0]

    def dead_actors(self) -> list[str]:
        return [f"{getattr(g, 'role', 'rollout')} rank {r}" for g in self.groups for r in g.dead_ranks()]

    def shutdown(self) -> None:
        _shutdown(self.groups, self.plan)


def preference_eval(
    policy: ActorGroup, heldout: Batch, beta: float, reduction: str, timeout_s: float
) -> dict[str, float]:
    """Held-out DPO metrics from the implicit reward beta * (log pi - log ref) of each response,
    on the sequence log-probs the loss trains (`reduction`: summed, or length-averaged for IPO)."""
    if not len(heldout):
        return {}
    logprobs = ray_get(timeout_s, policy=policy.async_run("compute_logprobs", heldout))[
        0
    ]  # (2P, T); all ranks join under ZeRO-3
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
    log pi(y_t) - log ref(y_t) with y ~ pi (the k1 estimate, in nats per sample and per token).
    The samples are also scored by the judges in eval.judges (eval/sampled/judge/<name>), with
    their text health, and written to <run>/samples/eval-<steps>.jsonl as RL's evaluations are.
    The judges' rows are the prompts alone (the pairs' prompts are instructions, not review text:
    on_topic would compare with them)."""

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
        self.timeout_s = cfg.trainer.step_timeout_s
        self.prompts = list(dict.fromkeys(p["prompt"] for p in pairs))[: max(cfg.data.eval_size, 1)]
        spec = cfg.models.policy
        self.rollout = RolloutGroup(
            plan,
            resolve_model_path(spec.path),
            None if spec.dtype == "auto" else spec.dtype,
            cfg.rollout,
            max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
            timeout_s=self.timeout_s,
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
        self.judging = HeldOutJudging(cfg.eval, Path(cfg.logging.dir) / cfg.logging.run_name)

    def __call__(self, updates: int) -> dict[str, float]:
        r, d = self.cfg.rollout, self.cfg.data
        self.rollout.sync_from(self.policy)  # the engines sample from the current policy
        texts = [format_prompt(self.tokenizer, p, d.chat_template) for p in self.prompts]
        # the fixed seed rollout.seed: the same draws before and after training
        sampling = sampling_settings(r, "eval_sampled", n=r.samples_per_prompt)
        samples = self.rollout.generate(texts, sampling, weights_from=self.policy)
        prompts = [self.prompts[s["prompt_index"]] for s in samples]
        scores = ray_get(self.timeout_s, reward=self.reward.async_run("score", prompts, [s["text"] for s in samples]))[
            0
        ]
        batch = collate_samples(
            [s["prompt_token_ids"] for s in samples],
            [s["response_token_ids"] for s in samples],
            self.tokenizer.pad_token_id,
            {"rollout_logprobs": [s["logprobs"] for s in samples]},
        )
        ref = ray_get(self.timeout_s, reference=self.reference.async_run("compute_logprobs", batch))[0]
        mask = batch["response_mask"]
        kl = ((batch["rollout_logprobs"] - ref) * mask).sum(-1)  # (B,)
        rows = [{"prompt": p} for p in self.prompts]
        judged = self.judging.score("sampled/", rows, samples, {"model": scores.tolist()}, scores.tolist())
        self.judging.finish(updates)  # the samples file; the alarm reads greedy passes only
        return judged | {
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


def _shutdown(groups: list, plan: PlacementPlan | None) -> None:
    for group in groups:
        if group is not None:
            group.kill()
    if plan is not None:
        plan.shutdown()


def _merge(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Losses are per-rank shares of one total (summed); every other metric is averaged."""
    keys = per_rank[0]
    return {k: sum(m[k] for m in per_rank) / (1 if k.endswith("loss") else len(per_rank)) for k in keys}
