"""The RL loop's driver side: PPO, GRPO and RLVR, one step at a time.

    generate -> score -> reference log-probs (+ critic values) -> advantages -> train -> sync -> metrics

`RLCoordinator.step` reads top to bottom; every Ray call is visible here (ObjectRefs come from
`async_*` methods and are resolved in the step itself with `ray_get`: ray.get with
trainer.step_timeout_s, naming the role and ranks that do not answer). The math is in rlhf/algos.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import ray
import torch
from transformers import AutoTokenizer

from actors.critic import CriticActor
from actors.group import ActorGroup, PlacementPlan, ray_get
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.rollout import RolloutGroup
from rlhf.algos import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    compute_kl,
    compute_loss_normalizer,
    informative_group_rows,
    masked_mean,
    whole_group_count,
)
from rlhf.batch import Batch, collate_samples
from rlhf.config import RunConfig
from rlhf.data.chat import apply_chat_template
from rlhf.models import resolve_model_path
from rlhf.rewards.registry import build_reward_functions, combine_rewards, run_reward_function
from rlhf.run_log import PhaseTimer

log = logging.getLogger(__name__)
COUNTS = ("reward_errors/", "reward_timeouts/")  # per-step sample counts: summed over refill rounds, not averaged


class RLCoordinator:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        a, models = cfg.algorithm, cfg.models
        self.policy_path = resolve_model_path(models.policy.path)
        self.tokenizer = AutoTokenizer.from_pretrained(models.policy.tokenizer or self.policy_path)
        roles = ["policy", "rollout"]
        roles += ["reference"] if a.kl.coef > 0 else []
        roles += ["critic"] if a.advantage == "gae" else []
        roles += ["reward"] if models.reward else []
        self.plan = PlacementPlan.create(cfg.resources, roles)
        common = {"trainer": cfg.trainer.model_dump(), "seed": cfg.trainer.seed}
        algo = a.model_dump()
        self.policy = ActorGroup(PolicyActor, "policy", self.plan, model=models.policy.model_dump(), algorithm=algo, **common)
        reference = models.reference or models.policy
        self.reference = ActorGroup(ReferenceActor, "reference", self.plan, model=reference.model_dump(), **common) if "reference" in roles else None
        critic = models.critic.model_dump() if models.critic and "critic" in roles else None  # only GAE uses it
        self.critic = ActorGroup(CriticActor, "critic", self.plan, model=critic, algorithm=algo, lr=cfg.trainer.critic_lr, **common) if critic else None
        self.reward_model = ActorGroup(RewardActor, "reward", self.plan, model=models.reward.model_dump(), **common) if models.reward else None
        max_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
        dtype = None if models.policy.dtype == "auto" else models.policy.dtype  # None: the worker's node decides
        self.timeout_s = cfg.trainer.step_timeout_s
        self.rollout = RolloutGroup(self.plan, self.policy_path, dtype, cfg.rollout, max_model_len=max_len, timeout_s=self.timeout_s)
        task = cfg.data.source.removeprefix("reasoning_gym:") if cfg.data.source.startswith("reasoning_gym:") else None
        self.rewards = build_reward_functions(cfg.rewards, task)
        self.kl_ctl = (AdaptiveKLController(a.kl.coef, a.kl.target, a.kl.horizon) if a.kl.adaptive
                       else FixedKLController(a.kl.coef))
        # With a token budget, ranks get token-balanced rows (not contiguous ones), so they pack
        # into about as many micro-batches and finish together.
        self.balance = cfg.trainer.micro_batch_tokens is not None

    # ------------------------------------------------------------------------------ one step
    def step(self, next_prompts: Callable[[int], list[dict]], step: int) -> dict[str, float]:
        """RL step number `step` on prompts drawn from `next_prompts(k)` (k more prompts each call)."""
        cfg, a, n = self.cfg, self.cfg.algorithm, self.cfg.rollout.samples_per_prompt
        timer, metrics = PhaseTimer(), {}

        samples, scores = self.generate_and_score(next_prompts, step, timer, metrics)  # (B,) scores
        if not samples:
            log.warning("step skipped: no prompt group had differing rewards")
            return metrics | {"skipped": 1.0}
        batch = self.collate(samples)
        mask = batch["response_mask"]  # (B, T)

        # Trained on once, in one optimizer step: the sampling policy is the current one, and the
        # policy's own training forward supplies the old log-probs (actors/policy.py).
        on_policy = cfg.trainer.epochs_per_rollout == 1 and len(batch) == cfg.trainer.global_batch_size
        need_old = not on_policy or (a.kl.mode == "reward" and self.reference is not None)
        with timer("reference"):
            if need_old:
                parts, order = batch.shard(self.policy.world_size, self.balance)  # batch[order] == cat(parts)
            old_refs = self.policy.async_scatter("compute_logprobs", parts) if need_old else []
            ref_refs = self.reference.async_run("compute_logprobs", batch)[:1] if self.reference else []
            value_refs = self.critic.async_run("compute_values", batch)[:1] if self.critic else []
            if need_old:
                batch["old_logprobs"] = torch.empty_like(batch["response_mask"])
                batch["old_logprobs"][order] = torch.cat(ray_get(self.timeout_s, policy=old_refs))
            if self.reference:
                batch["ref_logprobs"] = ray_get(self.timeout_s, reference=ref_refs)[0]
            if self.critic:
                batch["old_values"] = ray_get(self.timeout_s, critic=value_refs)[0]

        # advantages: pure functions on the driver
        kl = compute_kl(batch["old_logprobs"], batch["ref_logprobs"], a.kl.estimator) if need_old and self.reference else None
        penalty = self.kl_ctl.value * kl if a.kl.mode == "reward" and kl is not None else None
        batch["advantages"], returns = compute_advantages(
            a.advantage, scores, mask, group_size=n, kl_penalty=penalty,
            values=batch.get("old_values"), gamma=a.gamma, lam=a.lam,
        )
        if returns is not None:
            batch["returns"] = returns

        with timer("train"):
            train_metrics = self.train(batch)

        with timer("sync"):
            self.sync_weights()

        # KL(policy || reference) of the sampled tokens, before this step's update
        kl_mean = float(masked_mean(kl, mask)) if kl is not None else train_metrics.get("policy_kl", 0.0)
        if math.isfinite(kl_mean):  # a non-finite KL must not poison the adaptive coefficient
            self.kl_ctl.update(kl_mean, len(samples))
        lengths = mask.sum(-1)
        metrics.update(train_metrics)
        metrics.update({
            "reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": kl_mean, "kl_coef": self.kl_ctl.value, "response_length/mean": float(lengths.float().mean()),
            "samples": float(len(samples)),
        })
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        tokens = float(lengths.sum())
        metrics["throughput/generate_tokens_per_s"] = tokens / max(timer.seconds["generate"], 1e-9)
        metrics["time/step"] = sum(timer.seconds.values())
        return metrics

    # ------------------------------------------------------------------------------ pieces
    def generate_and_score(self, next_prompts, step: int, timer: PhaseTimer, metrics: dict) -> tuple[list[dict], torch.Tensor]:
        """Sample n completions per prompt and score them. With dynamic sampling, groups whose
        samples all score the same are dropped and another prompts_per_step prompts are drawn,
        up to `max_refills` extra rounds, until the step has prompts_per_step informative groups
        (DAPO); surplus groups of the last round are left unused."""
        cfg, a, n = self.cfg, self.cfg.algorithm, self.cfg.rollout.samples_per_prompt
        target = cfg.rollout.prompts_per_step * n
        samples, scores, drawn, restarts = [], [], 0, self.rollout.restarts
        for round_ in range(1 + (a.max_refills if a.dynamic_sampling else 0)):
            # a full round each time: when few groups are informative, asking for just the
            # missing count would rarely fill the step
            prompts = next_prompts(cfg.rollout.prompts_per_step)
            drawn += len(prompts)
            with timer("generate"):
                sampling = self.sampling(seed=self.sampling_seed(step, round_))
                # a worker that dies is restarted with the policy's weights and its prompts retried
                batch_samples = self.rollout.generate([self.format_prompt(p) for p in prompts], sampling, weights_from=self.policy)
            with timer("score"):
                batch_scores, reward_metrics = self.score(prompts, batch_samples)
            for k, v in reward_metrics.items():  # means weighted by samples so refills average correctly
                metrics[k] = metrics.get(k, 0.0) + (v if k.startswith(COUNTS) else v * len(batch_samples))
            if a.dynamic_sampling:
                rows = informative_group_rows(batch_scores, n)
                batch_samples, batch_scores = [batch_samples[i] for i in rows], batch_scores[rows]
            samples += batch_samples
            scores.append(batch_scores)
            if len(samples) >= target:
                break
        total = drawn * n
        for k in reward_metrics:
            if not k.startswith(COUNTS):  # error and timeout counts add up over rounds
                metrics[k] /= total
        metrics["rollout/worker_restarts"] = float(self.rollout.restarts - restarts)
        if a.dynamic_sampling:
            metrics["dynamic_sampling/kept_fraction"] = len(samples) / total
            metrics["dynamic_sampling/prompts_drawn"] = float(drawn)
        keep = whole_group_count(min(len(samples), target), n, cfg.trainer.global_batch_size)
        return samples[:keep], torch.cat(scores)[:keep]

    def train(self, batch: Batch) -> dict[str, float]:
        """epochs_per_rollout passes over the batch in global-batch optimizer steps."""
        cfg, a = self.cfg, self.cfg.algorithm
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.trainer.seed + len(batch)))
        constant = cfg.rollout.max_new_tokens * cfg.trainer.global_batch_size  # Dr.GRPO's fixed normaliser
        sums: dict[str, list[float]] = {}
        for _ in range(cfg.trainer.epochs_per_rollout):
            for mini in batch.select(order).split(cfg.trainer.global_batch_size):
                norm = float(compute_loss_normalizer(mini["response_mask"], a.loss_agg, constant))
                policy_refs = self.policy.async_scatter("train_step", mini.shard(self.policy.world_size, self.balance)[0],
                                                        normalizer=norm, kl_coef=self.kl_ctl.value)
                critic_refs = self.critic.async_scatter("train_step", mini.shard(self.critic.world_size, self.balance)[0],
                                                        normalizer=norm) if self.critic else []
                for ranks_metrics in ray_get(self.timeout_s, policy=policy_refs, critic=critic_refs):
                    for k, v in ranks_metrics.items():
                        sums.setdefault(k, []).append(v)
        # losses are per-rank shares of one total: sum over ranks, mean over steps; others: mean
        steps = cfg.trainer.epochs_per_rollout * (len(batch) // cfg.trainer.global_batch_size)
        skips = {"skipped_nonfinite": ("nonfinite_skips", self.policy)}
        skips |= {"critic_skipped_nonfinite": ("critic_nonfinite_skips", self.critic)} if self.critic else {}
        out = {k: (sum(v) / steps if k.endswith("loss") else sum(v) / len(v)) for k, v in sums.items() if k not in skips}
        for key, (name, group) in skips.items():  # updates skipped for NaN/inf: the ranks agree, so sum / ranks
            out[name] = sum(sums.get(key, [])) / group.world_size
        return out

    def sampling(self, greedy: bool = False, seed: int | None = None) -> dict:
        r = self.cfg.rollout
        if greedy:
            return {"n": 1, "temperature": 0.0, "max_tokens": r.max_new_tokens, "stop": r.stop or None}
        return {"n": r.samples_per_prompt, "temperature": r.temperature, "top_p": r.top_p,
                "max_tokens": r.max_new_tokens, "stop": r.stop or None, "seed": seed}

    def sampling_seed(self, step: int, round_: int) -> int:
        """A seed per step and refill round, not the engine's running RNG: a resumed run (new
        engines) then draws exactly the samples the uninterrupted run would have drawn."""
        return (self.cfg.rollout.seed * 1_000_003 + step * 101 + round_) % 2**31

    def format_prompt(self, row: dict) -> str:
        if self.cfg.data.chat_template == "tokenizer":
            return apply_chat_template(self.tokenizer, row["prompt"])
        return row["prompt"]

    def collate(self, samples: list[dict]) -> Batch:
        return collate_samples(
            [s["prompt_token_ids"] for s in samples], [s["response_token_ids"] for s in samples],
            self.tokenizer.pad_token_id, {"rollout_logprobs": [s["logprobs"] for s in samples]},
        )

    def score(self, prompts: list[dict], samples: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of every reward function (and the reward model) per sample: (B,)."""
        completions = [s["text"] for s in samples]
        rows = [prompts[s["prompt_index"]] for s in samples]
        model_ref = None
        if self.reward_model:  # start the reward model first; the functions run meanwhile
            model_ref = self.reward_model.async_run("score", [r["prompt"] for r in rows], completions)[0]
        per_function, metrics = {}, {}
        for reward in self.rewards:
            if reward.remote:
                continue
            values, errors, first_error, timeouts = run_reward_function(reward, completions, rows)
            if first_error:
                log.warning("reward %s: %d failures this step; first: %s", reward.name, errors, first_error)
            per_function[reward.name] = values
            metrics[f"reward/{reward.name}"] = sum(values) / max(len(values), 1)
            metrics[f"reward_errors/{reward.name}"] = float(errors)  # every sample given the fallback
            metrics[f"reward_timeouts/{reward.name}"] = float(timeouts)  # those of them lost to a timeout
        if model_ref is not None:
            per_function["model"] = ray_get(self.timeout_s, reward=[model_ref])[0].tolist()
            metrics["reward/model"] = sum(per_function["model"]) / len(per_function["model"])
        weights = {r.name: r.weight for r in self.rewards} | ({"model": 1.0} if "model" not in {r.name for r in self.rewards} else {})
        return torch.tensor(combine_rewards(per_function, weights), dtype=torch.float32), metrics

    def evaluate(self, prompts: list[dict]) -> dict[str, float]:
        """Held-out prompts answered greedily (`eval/reward/<fn>`, `eval/reward_mean`) and, with
        rollout.eval_samples = k > 0, sampled k times at the training temperature with a fixed
        seed (`eval/sampled/...`: the mean over samples, i.e. pass@1 of the policy's own
        distribution, the one RL trains), all scored by the run's rewards."""
        texts = [self.format_prompt(p) for p in prompts]
        k = self.cfg.rollout.eval_samples
        modes = {"": self.sampling(greedy=True)}
        if k:
            modes["sampled/"] = self.sampling(seed=self.cfg.rollout.seed) | {"n": k}
        out = {}
        for prefix, sampling in modes.items():
            samples = self.rollout.generate(texts, sampling, weights_from=self.policy)
            scores, per_fn = self.score(prompts, samples)
            out |= {f"eval/{prefix}{name}": v for name, v in per_fn.items() if name.startswith("reward/")}
            out[f"eval/{prefix}reward_mean"] = float(scores.mean())
            out[f"eval/{prefix}response_length"] = sum(len(s["response_token_ids"]) for s in samples) / len(samples)
        return out

    def sync_weights(self) -> None:
        """Every rollout engine takes the policy's current weights (fetched from rank 0)."""
        self.rollout.sync_from(self.policy)

    # ------------------------------------------------------------------------------ checkpoints
    def trainable_groups(self) -> dict[str, ActorGroup]:
        return {"policy": self.policy} | ({"critic": self.critic} if self.critic else {})

    def save_checkpoint(self, folder) -> dict:
        """Each trainable role writes its DeepSpeed state under `folder/<role>`; returns the
        driver-side state (the KL controller) for the caller's driver.pt."""
        ray_get(self.timeout_s, **{role: group.async_run("save_checkpoint", str(folder / role))
                                   for role, group in self.trainable_groups().items()})
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_checkpoint(self, folder, driver_state: dict) -> None:
        """Restore every trainable role and the KL controller, then hand the engines the
        restored policy weights (they started from the base model)."""
        ray_get(self.timeout_s, **{role: group.async_run("load_checkpoint", str(folder / role))
                                   for role, group in self.trainable_groups().items()})
        self.kl_ctl.load_state_dict(driver_state["kl_controller"])
        self.sync_weights()

    def dead_actors(self) -> list[str]:
        """'policy rank 1', 'rollout rank 0', ...: the actors of this run that have died."""
        groups = {"policy": self.policy, "reference": self.reference, "critic": self.critic,
                  "reward": self.reward_model, "rollout": self.rollout}
        return [f"{role} rank {rank}" for role, group in groups.items() if group is not None for rank in group.dead_ranks()]

    def shutdown(self) -> None:
        for group in (self.policy, self.reference, self.critic, self.reward_model, self.rollout):
            if group is not None:
                group.kill()
        self.plan.shutdown()
