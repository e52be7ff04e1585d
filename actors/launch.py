"""Starting a run: connect to (or start) Ray, then drive the loop the config names.

Recipes call `main(default_config)`. With `RAY_ADDRESS` set (as under `ray job submit`) the run
joins that cluster; otherwise it starts a local one sized to this machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path

import torch

from rlhf.config import ConfigError, RunConfig, dump_config, load_config
from rlhf.data.sources import DataError, load_prompts
from rlhf.data.stream import PromptStream
from rlhf.run_log import RunLogger, format_metrics

log = logging.getLogger("raylhf")


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # join the cluster this job was submitted to
    else:
        # A private local cluster: no dashboard auth token dance, quiet workers.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=os.environ.get("RAYLHF_WORKER_LOGS") == "1")


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
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return run(cfg)


def run(cfg: RunConfig) -> dict:
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    run_dir = Path(cfg.logging.dir) / cfg.logging.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    ensure_ray()
    if cfg.is_rl:
        result = run_rl(cfg, run_dir)
    elif cfg.algorithm.name == "sft":
        from actors.supervised import run_sft

        result = run_sft(cfg, run_dir)
    elif cfg.algorithm.name == "reward_model":
        from actors.preference import run_reward_model

        result = run_reward_model(cfg, run_dir)
    else:
        from actors.preference import run_dpo

        result = run_dpo(cfg, run_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_rl(cfg: RunConfig, run_dir: Path) -> dict:
    from actors.coordinator import RLCoordinator

    train, heldout = load_prompts(cfg.data, "train"), load_prompts(cfg.data, "eval")
    log.info("data: %d train prompts, %d held-out prompts from %s", len(train), len(heldout), cfg.data.source)
    logger = RunLogger(run_dir, cfg.trainer.total_steps, cfg.logging.jsonl, cfg.logging.tensorboard)
    coordinator = RLCoordinator(cfg)
    try:
        before = coordinator.evaluate(heldout) if heldout else {}
        log.info("held-out before training: %s", format_metrics(before))
        logger.log(0, before)
        logger.restart_clock()
        stream = PromptStream(train, cfg.data.seed)
        for step in range(1, cfg.trainer.total_steps + 1):
            metrics = coordinator.step(stream.next)
            logger.log(step, metrics)
            if step % cfg.logging.log_every == 0:
                log.info(logger.progress(step, metrics, ("reward/mean", "kl", "policy_loss", "time/generate", "time/train")))
        after = coordinator.evaluate(heldout) if heldout else {}
        logger.log(cfg.trainer.total_steps, after)
        log.info("held-out after training:  %s", format_metrics(after))
        return {"before": before, "after": after, "steps": cfg.trainer.total_steps}
    finally:
        logger.close()
        coordinator.shutdown()
