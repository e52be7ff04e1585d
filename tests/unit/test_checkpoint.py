"""Checkpoint folders are published atomically, pruned, and a resume rewinds the logs to them."""
import json
import random

import pytest
import torch

from rlhf.checkpoint import DRIVER_STATE, CheckpointDir, rng_state, set_rng_state
from rlhf.run_log import RunLogger


def write_checkpoint(ckpt: CheckpointDir, step: int) -> None:
    folder = ckpt.staging(step)
    (folder / "policy").mkdir()
    (folder / "policy" / "weights").write_text(f"step {step}")
    torch.save({"step": step}, folder / DRIVER_STATE)
    ckpt.commit(step)


def test_latest_is_the_newest_committed_step_and_old_ones_are_pruned(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ckpt", keep_last=2)
    assert ckpt.latest() is None
    for step in (2, 4, 6):
        write_checkpoint(ckpt, step)
    step, folder = ckpt.latest()
    assert step == 6 and (folder / "policy" / "weights").read_text() == "step 6"
    assert [s for s, _ in ckpt.committed()] == [4, 6]


def test_a_crash_while_saving_leaves_the_last_good_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ckpt")
    write_checkpoint(ckpt, 2)
    half = ckpt.staging(4)  # the crash: roles wrote their parts, the driver state never came
    (half / "policy").mkdir()
    assert ckpt.latest()[0] == 2
    with pytest.raises(RuntimeError, match="not fully written"):
        ckpt.commit(4)
    assert ckpt.latest()[0] == 2
    write_checkpoint(ckpt, 4)  # the next save of that step starts from a clean staging folder
    assert ckpt.latest()[0] == 4 and not any(p.name.endswith(".partial") for p in ckpt.root.iterdir())


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def read_steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resumed_logger_keeps_steps_up_to_the_checkpoint(tmp_path):
    logger = RunLogger(tmp_path, total_steps=5, tensorboard=False)
    for step in range(0, 5):
        logger.log(step, {"reward/mean": float(step)})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')  # a line cut short by the crash

    resumed = RunLogger(tmp_path, total_steps=5, tensorboard=False, resume_step=2)
    resumed.log(3, {"reward/mean": 30.0})
    resumed.close()
    assert read_steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 3]

    fresh = RunLogger(tmp_path, total_steps=5, tensorboard=False)  # a new run with the same name
    fresh.close()
    assert read_steps(tmp_path / "metrics.jsonl") == []
