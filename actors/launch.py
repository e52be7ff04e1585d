"""Starting a run: connect to (or start) Ray, then drive the loop the config names.

Recipes call `main(default_config)`. With `RAY_ADDRESS` set (as under `ray job submit`) the run
joins that cluster; otherwise it starts a local one sized to this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
from pathlib import Path

import torch

from rlhf.checkpoint import (
    DRIVER_STATE,
    CheckpointDir,
    CheckpointError,
    RunIdentity,
    resume_fingerprint,
    rng_state,
    set_rng_state,
)
from rlhf.config import ConfigError, RunConfig, dump_config, load_config
from rlhf.data.sources import DataError, load_prompts
from rlhf.data.stream import PromptStream
from rlhf.guards import NonFiniteError, NonFiniteGuard
from rlhf.models import check_model_paths
from rlhf.preflight import check_before_start
from rlhf.run_folder import RunFolder, RunFolderError, open_run_folder
from rlhf.run_log import RunLogger, format_metrics

log = logging.getLogger("raylhf")


def ensure_ray():
    """Join RAY_ADDRESS's cluster, or start the private local one (token auth, loopback only,
    stopped with this process however it ends: actors/local_cluster.py); returns the local
    cluster it started (its temp dir and watchdog), else None."""
    from actors.local_cluster import init_ray

    return init_ray(log_to_driver=os.environ.get("RAYLHF_WORKER_LOGS") == "1")


def parse(argv: list[str] | None, default_config: str) -> RunConfig:
    parser = argparse.ArgumentParser(description="Run a raylhf recipe.")
    parser.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.kl.coef=0.02")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def main(default_config: str, argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse(argv, default_config)
        return run(cfg)
    except (ConfigError, DataError, RunFolderError, CheckpointError) as e:  # also model paths, cluster size
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteError, ActorFailure) as e:  # the run stopped itself (NaNs: after a checkpoint)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def run(cfg: RunConfig) -> dict:
    """Run `cfg` in its own run folder: `<logging.dir>/<run_name>`, or `<run_name>-2`, ... when
    that one holds another run and this is not a resume of it (rlhf/run_folder.py)."""
    check_model_paths(cfg.models)  # ConfigError before Ray or any actor starts
    check_before_start(cfg)  # data sources, task names, reward functions: also before Ray
    if not cfg.is_rl and (cfg.checkpoint.resume or cfg.checkpoint.resume_from):
        raise ConfigError(
            f"algorithm.name={cfg.algorithm.name!r} does not checkpoint mid-run, so there is nothing "
            "to resume: drop checkpoint.resume / checkpoint.resume_from (a new run gets a new folder)"
        )
    folder = open_run_folder(cfg.logging.dir, cfg.logging.run_name, resume=cfg.checkpoint.resume)
    began = False
    try:
        if folder.name != cfg.logging.run_name:  # the metrics, the config saved and wandb carry the folder's name
            cfg = cfg.model_copy(deep=True)
            cfg.logging.run_name = folder.name
        run_dir = folder.path
        if cfg.is_rl:  # found and verified before anything is written or any actor starts
            checkpoints = rl_checkpoints(cfg, folder)
            start = resume_point(cfg, checkpoints, restarted=False)
        folder.begin()
        began = True
        random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        ensure_ray()
        if cfg.is_rl:
            result = run_rl(cfg, run_dir, train_and_heldout(cfg), checkpoints, start)
        elif cfg.algorithm.name == "sft":
            from actors.supervised import run_sft

            result = run_sft(cfg, run_dir)
        elif cfg.algorithm.name == "reward_model":
            from actors.preference import run_reward_model

            result = run_reward_model(cfg, run_dir)
        else:
            from actors.preference import run_dpo

            result = run_dpo(cfg, run_dir)
        result |= {"run_dir": str(run_dir)}  # `<run_name>-2`, ... when the name was taken
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
        folder.update(status="finished")
        return result
    except BaseException as e:
        with contextlib.suppress(OSError):  # never hide the error itself
            if began:
                folder.update(status="stopped", error=(f"{type(e).__name__}: {e}".splitlines() or [""])[0][:500])
            else:  # refused before it began: a resumed run's folder is left as it was, a new one removed
                folder.abandon()
        raise
    finally:
        folder.close()


class ActorFailure(RuntimeError):
    """An actor of the run died or hung, and checkpoint.max_restarts restarts did not get past it."""


def rl_checkpoints(cfg: RunConfig, folder: RunFolder) -> CheckpointDir:
    """This run's checkpoints: in its run folder, or on shared storage (checkpoint.dir) in a
    folder of its own there, so that two runs never write the same step's folder."""
    run_dir = folder.path
    root = (
        Path(cfg.checkpoint.dir) / f"{folder.name}-{folder.run_id[:8]}"
        if cfg.checkpoint.dir
        else run_dir / "checkpoints"
    )
    checkpoints = CheckpointDir(
        root, RunIdentity(folder.run_id, folder.name, resume_fingerprint(cfg)), cfg.checkpoint.keep_last
    )
    folder.info["checkpoints"] = str(checkpoints.root)  # written to run.json when the run begins
    return checkpoints


def train_and_heldout(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    train, heldout = load_prompts(cfg.data, "train", cfg.rewards), load_prompts(cfg.data, "eval", cfg.rewards)
    log.info("data: %d train prompts, %d held-out prompts from %s", len(train), len(heldout), cfg.data.source)
    return train, heldout


def run_rl(
    cfg: RunConfig,
    run_dir: Path,
    data: tuple[list[dict], list[dict]],
    checkpoints: CheckpointDir,
    start: tuple[int, Path] | None,
) -> dict:
    """The RL loop from `start` (a verified checkpoint, or step 1 if None), restarted when an actor
    dies or hangs: every group is shut down (placement groups freed), new ones are built and the
    run resumes from its newest intact checkpoint (from `start` if it wrote none yet), at most
    checkpoint.max_restarts times. A worker lost during generation is restarted in place by
    RolloutGroup instead, without this."""
    train, heldout = data
    restarts = 0
    while True:
        try:
            if restarts:
                start = resume_point(cfg, checkpoints, restarted=True)
            result = run_rl_once(cfg, run_dir, train, heldout, checkpoints, start)
            return result | {"restarts": restarts}
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


def run_rl_once(
    cfg: RunConfig,
    run_dir: Path,
    train: list[dict],
    heldout: list[dict],
    checkpoints: CheckpointDir,
    resume_from: tuple[int, Path] | None,
) -> dict:
    """One attempt at the RL loop with fresh actors, from the checkpoint `resume_from` (step 1 if
    None); ActorFailure when one of them dies or hangs."""
    import ray

    from actors.coordinator import RLCoordinator
    from actors.group import StepTimeoutError
    from actors.metrics import metric_sinks  # Ray dashboard metrics and wandb, as cfg.logging asks

    logger = RunLogger(
        run_dir,
        cfg.trainer.total_steps,
        cfg.logging.jsonl,
        cfg.logging.tensorboard,
        resume_step=resume_from[0] if resume_from else None,
        sinks=metric_sinks(cfg, "coordinator", run_dir),
    )
    coordinator = RLCoordinator(cfg)
    stream = PromptStream(train, cfg.data.seed)
    step = resume_from[0] + 1 if resume_from else 1  # the step under way, for the failure message
    try:
        if resume_from:
            done, folder = resume_from
            state = torch.load(folder / DRIVER_STATE, weights_only=False)
            coordinator.load_checkpoint(folder, state)
            stream.position, before = state["data_position"], state["heldout_before"]
            set_rng_state(state["rng"])
            log.info("resumed from %s: step %d done, continuing at step %d", folder, done, done + 1)
        else:
            random.seed(cfg.trainer.seed)  # a restart from scratch draws what the first attempt drew
            torch.manual_seed(cfg.trainer.seed)
            done, before = 0, coordinator.evaluate(heldout) if heldout else {}
            log.info("held-out before training: %s", format_metrics(before))
            logger.log(0, before)
        logger.restart_clock(steps_done=done)

        def save(step: int) -> Path:
            folder = checkpoints.staging(step)
            state = coordinator.save_checkpoint(folder) | {
                "step": step,
                "data_position": stream.position,
                "heldout_before": before,
                "rng": rng_state(),
                "config": dump_config(cfg),
            }
            torch.save(state, folder / DRIVER_STATE)  # written last: commit() checks for it, hashes, publishes
            return checkpoints.commit(step)

        every = cfg.checkpoint.every_n_steps
        guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        for step in range(done + 1, cfg.trainer.total_steps + 1):
            metrics = coordinator.step(stream.next, step)
            logger.log(step, metrics)
            if step % cfg.logging.log_every == 0:
                log.info(
                    logger.progress(step, metrics, ("reward/mean", "kl", "policy_loss", "time/generate", "time/train"))
                )
            for key in ("nonfinite_skips", "critic_nonfinite_skips"):
                if metrics.get(key):
                    log.warning(
                        "step %d: %s: %g update(s) skipped for a non-finite loss or gradient", step, key, metrics[key]
                    )
            if metrics.get("rollout/worker_restarts"):
                log.warning("step %d: %g rollout worker(s) restarted", step, metrics["rollout/worker_restarts"])
            if failed := guard.update(step, metrics):
                # the skipped updates changed nothing, so this state is the last good one
                raise NonFiniteError(guard.message(failed, str(save(step))))
            if (
                heldout
                and cfg.trainer.eval_every
                and step % cfg.trainer.eval_every == 0
                and step < cfg.trainer.total_steps
            ):
                logger.log(step, coordinator.evaluate(heldout))
            if (every and step % every == 0) or step == cfg.trainer.total_steps:
                save(step)
        step = cfg.trainer.total_steps + 1  # past the loop: the final evaluation and export
        after = coordinator.evaluate(heldout) if heldout else {}
        logger.log(cfg.trainer.total_steps, after)
        log.info("held-out after training:  %s", format_metrics(after))
        final = str((run_dir / "final").resolve())  # absolute: the actors' working directory may differ
        ray.get(coordinator.policy.async_run("save_pretrained", final))
        log.info("saved the trained policy as a Hugging Face folder: %s", final)
        return {"before": before, "after": after, "steps": cfg.trainer.total_steps, "final_path": final}
    except (ray.exceptions.RayError, StepTimeoutError) as e:
        dead = coordinator.dead_actors()
        if not dead and not isinstance(e, (ray.exceptions.RayActorError, StepTimeoutError)):
            raise  # a task raised (a bug, bad input) and every actor lives: a restart would fail the same way
        where = f"step {step}" if step <= cfg.trainer.total_steps else "the final evaluation/export"
        what = f"{', '.join(dead)} died" if dead else str(e).splitlines()[0]
        raise ActorFailure(f"{what} during {where} ({type(e).__name__})") from e
    finally:
        logger.close()
        coordinator.shutdown()
