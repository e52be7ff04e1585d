"""Starting a run: connect to (or start) Ray, then drive the loop the config names (actors/driver.py).

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

import torch

from actors.driver import ActorFailure, drive, resume_point, run_checkpoints
from rlhf.checkpoint import CheckpointError
from rlhf.config import ConfigError, RunConfig, dump_config, load_config
from rlhf.data.sources import DataError
from rlhf.evaluation.alarm import RewardHackingError
from rlhf.guards import NonFiniteError
from rlhf.models import check_model_paths
from rlhf.preflight import check_before_start
from rlhf.run_folder import RunFolderError, open_run_folder

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
    except (NonFiniteError, ActorFailure, RewardHackingError) as e:  # the run stopped itself (after a checkpoint)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def run(cfg: RunConfig) -> dict:
    """Run `cfg` in its own run folder: `<logging.dir>/<run_name>`, or `<run_name>-2`, ... when
    that one holds another run and this is not a resume of it (rlhf/run_folder.py). Every loop
    (RL, SFT, DPO, reward model) runs through actors/driver.py and returns the same keys
    (rlhf/loop.py: RESULT_KEYS), also written to `<run folder>/result.json`."""
    check_model_paths(cfg.models)  # ConfigError before Ray or any actor starts
    check_before_start(cfg)  # data sources, task names, reward functions: also before Ray
    folder = open_run_folder(cfg.logging.dir, cfg.logging.run_name, resume=cfg.checkpoint.resume)
    began = False
    try:
        if folder.name != cfg.logging.run_name:  # the metrics, the config saved and wandb carry the folder's name
            cfg = cfg.model_copy(deep=True)
            cfg.logging.run_name = folder.name
        run_dir = folder.path
        checkpoints = run_checkpoints(cfg, folder)  # found and verified before anything is written or any actor starts
        start = resume_point(cfg, checkpoints, restarted=False)
        folder.begin()
        began = True
        random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        ensure_ray()
        result = drive(cfg, run_dir, checkpoints, start)
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
