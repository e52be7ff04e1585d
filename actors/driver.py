"""The one outer loop every training loop runs in: RL (PPO, GRPO, RLVR), SFT, DPO, reward model.

    setup -> [resume from a verified checkpoint | evaluate "before"] -> step k, log, (evaluate),
    (checkpoint) ... -> evaluate "after" -> export -> one result shape (rlhf/loop.py)

A loop (rlhf/loop.py: TrainingLoop) says how to set up, step, evaluate, save and load its state
and export; this module does the rest the same way for all of them: checkpoints through
rlhf/checkpoint.py (atomic, hashed, verified on resume), metrics to the run log and its sinks
(JSONL, TensorBoard, Ray gauges, wandb), the progress line, the non-finite guard, and restarts:
an actor that dies or does not answer within trainer.step_timeout_s (every remote call goes
through actors.group.ray_get) shuts every group down and resumes from the newest intact
checkpoint, at most checkpoint.max_restarts times.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from actors.group import StepTimeoutError
from rlhf.checkpoint import DRIVER_STATE, CheckpointDir, RunIdentity, resume_fingerprint, rng_state, set_rng_state
from rlhf.config import RunConfig, dump_config
from rlhf.guards import NonFiniteError, NonFiniteGuard
from rlhf.loop import TrainingLoop, due, eval_due, run_result
from rlhf.run_folder import RunFolder
from rlhf.run_log import RunLogger, format_metrics

log = logging.getLogger("raylhf")

SKIP_KEYS = ("nonfinite_skips", "critic_nonfinite_skips", "skipped_nonfinite")  # updates skipped for NaN/inf


class ActorFailure(RuntimeError):
    """An actor of the run died or hung, and checkpoint.max_restarts restarts did not get past it."""


def build_loop(cfg: RunConfig) -> TrainingLoop:
    """The training loop `algorithm.name` names (not yet set up)."""
    if cfg.is_rl:
        from actors.rl_loop import RLLoop

        return RLLoop(cfg)
    if cfg.algorithm.name == "sft":
        from actors.supervised import SFTLoop

        return SFTLoop(cfg)
    if cfg.algorithm.name == "reward_model":
        from actors.preference import RewardModelLoop

        return RewardModelLoop(cfg)
    from actors.preference import DPOLoop

    return DPOLoop(cfg)


def run_checkpoints(cfg: RunConfig, folder: RunFolder) -> CheckpointDir:
    """This run's checkpoints: in its run folder, or on shared storage (checkpoint.dir) in a
    folder of its own there, so that two runs never write the same step's folder."""
    root = (
        Path(cfg.checkpoint.dir) / f"{folder.name}-{folder.run_id[:8]}"
        if cfg.checkpoint.dir
        else folder.path / "checkpoints"
    )
    checkpoints = CheckpointDir(
        root, RunIdentity(folder.run_id, folder.name, resume_fingerprint(cfg)), cfg.checkpoint.keep_last
    )
    folder.info["checkpoints"] = str(checkpoints.root)  # written to run.json when the run begins
    return checkpoints


def resume_point(cfg: RunConfig, checkpoints: CheckpointDir, restarted: bool) -> tuple[int, Path] | None:
    """(step, folder) of the checkpoint this attempt starts from, verified; None: step 1.
    CheckpointError (nothing loaded, nothing deleted) when no checkpoint can be trusted."""
    if cfg.checkpoint.resume or restarted:
        found = checkpoints.latest_good(asked=cfg.checkpoint.resume and not restarted)
        if found is not None:
            return found
    if cfg.checkpoint.resume_from:
        return checkpoints.on_purpose(cfg.checkpoint.resume_from)
    if cfg.checkpoint.resume or restarted:
        log.info("resuming: no checkpoint in %s yet; starting from step 1", checkpoints.root)
    return None


def drive(
    cfg: RunConfig,
    run_dir: Path,
    checkpoints: CheckpointDir,
    start: tuple[int, Path] | None,
    make_loop: Callable[[RunConfig], TrainingLoop] = build_loop,
) -> dict:
    """The loop from `start` (a verified checkpoint, or step 1 if None), restarted when an actor
    dies or hangs: every group is shut down (placement groups freed), new ones are built and the
    run resumes from its newest intact checkpoint (from `start` if it wrote none yet), at most
    checkpoint.max_restarts times. A worker lost during generation is restarted in place by
    RolloutGroup instead, without this."""
    restarts = 0
    while True:
        try:
            if restarts:
                start = resume_point(cfg, checkpoints, restarted=True)
            before, after, final = attempt(cfg, run_dir, make_loop(cfg), checkpoints, start)
            return run_result(before, after, cfg.trainer.total_steps, final, str(run_dir), restarts)
        except ActorFailure as failure:
            if restarts >= cfg.checkpoint.max_restarts:
                raise ActorFailure(
                    f"{failure}; gave up after {restarts} restart(s) "
                    f"(checkpoint.max_restarts={cfg.checkpoint.max_restarts})"
                ) from failure.__cause__
            restarts += 1
            log.error(
                "%s; restarting every actor group and resuming from the newest checkpoint (restart %d of at most %d)",
                failure,
                restarts,
                cfg.checkpoint.max_restarts,
            )


def attempt(
    cfg: RunConfig,
    run_dir: Path,
    loop: TrainingLoop,
    checkpoints: CheckpointDir,
    resume_from: tuple[int, Path] | None,
) -> tuple[dict[str, float], dict[str, float], str]:
    """One attempt with fresh actors, from the checkpoint `resume_from` (step 1 if None):
    (held-out before, held-out after, exported folder); ActorFailure when an actor dies or hangs."""
    from actors.metrics import metric_sinks  # Ray dashboard metrics and wandb, as cfg.logging asks

    total = cfg.trainer.total_steps
    logger = RunLogger(
        run_dir,
        total,
        cfg.logging.jsonl,
        cfg.logging.tensorboard,
        resume_step=resume_from[0] if resume_from else None,
        sinks=metric_sinks(cfg, loop.sink_role, run_dir),
    )
    step = resume_from[0] + 1 if resume_from else 1  # the step under way, for the failure message
    try:
        loop.setup()
        if resume_from:
            done, folder = resume_from
            state = torch.load(folder / DRIVER_STATE, weights_only=False)
            loop.load_state(folder, state)
            before = state["heldout_before"]
            set_rng_state(state["rng"])
            log.info("resumed from %s: step %d done, continuing at step %d", folder, done, done + 1)
        else:
            random.seed(cfg.trainer.seed)  # a restart from scratch draws what the first attempt drew
            torch.manual_seed(cfg.trainer.seed)
            done, before = 0, loop.evaluate()
            log.info("held-out before training: %s", format_metrics(before))
            logger.log(0, before)
        logger.restart_clock(steps_done=done)  # s/step and the ETA count this attempt's steps only

        def save(step: int) -> Path:
            folder = checkpoints.staging(step)
            state = loop.save_state(folder) | {
                "step": step,
                "heldout_before": before,
                "rng": rng_state(),
                "config": dump_config(cfg),
            }
            torch.save(state, folder / DRIVER_STATE)  # written last: commit() checks for it, hashes, publishes
            return checkpoints.commit(step)

        guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        for step in range(done + 1, total + 1):
            metrics = loop.step(step)
            logger.log(step, metrics)
            if step % cfg.logging.log_every == 0:
                log.info(logger.progress(step, metrics, loop.progress_keys))
            warn_about(step, metrics)
            if failed := guard.update(step, metrics):
                # the skipped updates changed nothing, so this state is the last good one
                raise NonFiniteError(guard.message(failed, str(save(step))))
            if eval_due(step, cfg.trainer.eval_every, total) and (held_out := loop.evaluate()):
                logger.log(step, held_out)
            if due(step, cfg.checkpoint.every_n_steps, total):
                save(step)
        step = total + 1  # past the loop: the final evaluation and export
        after = loop.evaluate()
        logger.log(total, after)
        log.info("held-out after training:  %s", format_metrics(after))
        final = loop.export((run_dir / "final").resolve())  # absolute: the actors' working directory may differ
        log.info("saved the trained model as a Hugging Face folder: %s", final)
        return before, after, final
    except (ray.exceptions.RayError, StepTimeoutError) as e:
        dead = loop.dead_actors()
        if not dead and not isinstance(e, (ray.exceptions.RayActorError, StepTimeoutError)):
            raise  # a task raised (a bug, bad input) and every actor lives: a restart would fail the same way
        where = f"step {step}" if step <= total else "the final evaluation/export"
        what = f"{', '.join(dead)} died" if dead else str(e).splitlines()[0]
        raise ActorFailure(f"{what} during {where} ({type(e).__name__})") from e
    finally:
        logger.close()
        loop.shutdown()


def warn_about(step: int, metrics: dict[str, float]) -> None:
    for key in SKIP_KEYS:
        if metrics.get(key):
            log.warning("step %d: %s: %g update(s) skipped for a non-finite loss or gradient", step, key, metrics[key])
    if metrics.get("rollout/worker_restarts"):
        log.warning("step %d: %g rollout worker(s) restarted", step, metrics["rollout/worker_restarts"])
