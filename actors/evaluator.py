"""The distributed half of the command-line evaluator (recipes/evaluate.py): start the rollout
engine (and the reward model, when the config has one), generate, score with the run's rewards.

The same pieces as a run: RolloutGroup (vLLM workers, with the vLLM-CPU seeded-sampling
work-around inside RolloutWorker), RewardActor, the reward functions in their sandboxes, every
wait bounded by a deadline. The judging itself is pure (rlhf/evaluation).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from actors.group import ActorGroup, PlacementPlan, ray_get
from actors.reward import RewardActor
from actors.rollout import RolloutGroup
from rlhf.config import RunConfig
from rlhf.rewards.registry import build_reward_functions, combine_rewards, run_reward_function

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 1800.0  # engine start + one eval pass on a busy 2-core CPU stays well under it


class ModelScorer:
    """Generates with one policy model and scores with the config's rewards (functions and model)."""

    def __init__(self, cfg: RunConfig, model_path: str):
        self.cfg = cfg
        self.timeout_s = cfg.trainer.step_timeout_s or DEFAULT_TIMEOUT_S
        roles = ["rollout"] + (["reward"] if cfg.models.reward else [])
        self.plan = PlacementPlan.create(cfg.resources, roles)
        policy = cfg.models.policy
        dtype = None if policy is None or policy.dtype == "auto" else policy.dtype
        # episodes (cfg.environment): the engine's context is the episode's whole token budget
        self.environment = cfg.environment.model_dump() if cfg.environment else None
        max_len = (
            cfg.environment.max_tokens if cfg.environment else cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
        )
        self.rollout = RolloutGroup(
            self.plan, model_path, dtype, cfg.rollout, max_model_len=max_len, timeout_s=self.timeout_s
        )
        self.reward_model = (
            ActorGroup(
                RewardActor,
                "reward",
                self.plan,
                model=cfg.models.reward.model_dump(),
                trainer=cfg.trainer.model_dump(),
                seed=cfg.trainer.seed,
            )
            if cfg.models.reward
            else None
        )
        source = cfg.data.source
        task = source.removeprefix("reasoning_gym:") if source.startswith("reasoning_gym:") else None
        self.rewards = [r for r in build_reward_functions(cfg.rewards, task) if not r.remote]

    def generate(self, texts: list, sampling: dict) -> list[dict]:
        """Samples for prompt texts, or (with an environment) episode records for data rows."""
        # deadline: trainer.step_timeout_s (or DEFAULT_TIMEOUT_S)
        return self.rollout.generate(texts, sampling, environment=self.environment)

    def score(self, prompts: list[dict], samples: list[dict]) -> tuple[dict[str, list[float]], list[float], dict]:
        """({reward name: per-sample values}, the combined training reward per sample, {name: errors}).
        Episodes with environment.reward = "environment": the return is what the environment gave."""
        if self.environment is not None and self.environment["reward"] == "environment":
            returns = [float(s["env_reward"]) for s in samples]
            return {"environment": returns}, returns, {}
        completions = [s["text"] for s in samples]
        rows = [prompts[s["prompt_index"]] for s in samples]
        model_ref = (
            self.reward_model.async_run("score", [r["prompt"] for r in rows], completions)[0]
            if self.reward_model
            else None
        )
        values, errors = {}, {}
        for reward in self.rewards:
            values[reward.name], errors[reward.name], first_error, _ = run_reward_function(reward, completions, rows)
            if first_error:
                log.warning("reward %s: %d failures; first: %s", reward.name, errors[reward.name], first_error)
        if model_ref is not None:
            values["model"] = ray_get(self.timeout_s, reward=[model_ref])[0].tolist()
        weights = {r.name: r.weight for r in self.rewards} | (
            {"model": 1.0} if self.reward_model and "model" not in {r.name for r in self.rewards} else {}
        )
        total = combine_rewards(values, weights) if values else [0.0] * len(samples)
        return values, total, errors

    def shutdown(self) -> None:
        for group in (self.rollout, self.reward_model):
            if group is not None:
                group.kill()
        self.plan.shutdown()


def export_checkpoint(cfg: RunConfig, checkpoint: Path, out: Path | None = None) -> str:
    """A Hugging Face folder of the policy in an RL checkpoint folder (`<step folder>/policy`:
    DeepSpeed state): a policy group loads it and writes the full weights, which vLLM can read."""
    from actors.policy import PolicyActor

    out = out or Path(tempfile.mkdtemp(prefix="raylhf-eval-"))
    plan = PlacementPlan.create(cfg.resources, ["policy"])
    timeout = cfg.trainer.step_timeout_s or DEFAULT_TIMEOUT_S
    policy = ActorGroup(
        PolicyActor,
        "policy",
        plan,
        model=cfg.models.policy.model_dump(),
        algorithm=cfg.algorithm.model_dump(),
        trainer=cfg.trainer.model_dump(),
        seed=cfg.trainer.seed,
    )
    try:
        ray_get(timeout, policy=policy.async_run("load_checkpoint", str((checkpoint / "policy").resolve())))
        ray_get(timeout, policy=policy.async_run("save_pretrained", str(out.resolve())))
    finally:
        policy.kill()
        plan.shutdown()
    return str(out)
