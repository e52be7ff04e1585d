"""Checkpoint folders are published atomically with a manifest, pruned (this run's only), and a
resume rewinds the logs to them. The attacks (shared folders, damaged files) are in
tests/safety/test_checkpoints.py."""

import hashlib
import json
import random

import pytest
import torch

from rlhf.checkpoint import (
    DRIVER_STATE,
    MANIFEST,
    CheckpointDir,
    CheckpointError,
    RunIdentity,
    differences,
    read_manifest,
    resume_fingerprint,
    rng_state,
    set_rng_state,
    verify_files,
)
from rlhf.config import ConfigError, validate_config
from rlhf.run_log import RunLogger

FINGERPRINT = {"layout": {"trainer.zero_stage": 2}, "model": {"models.policy.path": "/m"}, "data": {}}


def identity(run_id: str = "a" * 32, name: str = "a") -> RunIdentity:
    return RunIdentity(run_id, name, FINGERPRINT)


def write_checkpoint(ckpt: CheckpointDir, step: int):
    folder = ckpt.staging(step)
    (folder / "policy").mkdir()
    (folder / "policy" / "weights").write_text(f"step {step}")
    torch.save({"step": step}, folder / DRIVER_STATE)
    return ckpt.commit(step)


def test_latest_good_is_the_newest_and_old_ones_are_pruned(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ckpt", identity(), keep_last=2)
    assert ckpt.latest_good() is None
    for step in (2, 4, 6):
        write_checkpoint(ckpt, step)
    step, folder = ckpt.latest_good()
    assert step == 6 and (folder / "policy" / "weights").read_text() == "step 6"
    assert [s for s, _ in ckpt.committed()] == [4, 6]


def test_a_crash_while_saving_leaves_the_last_good_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ckpt", identity())
    write_checkpoint(ckpt, 2)
    half = ckpt.staging(4)  # the crash: roles wrote their parts, the driver state never came
    (half / "policy").mkdir()
    assert ckpt.latest_good()[0] == 2
    with pytest.raises(RuntimeError, match="not fully written"):
        ckpt.commit(4)
    assert ckpt.latest_good()[0] == 2
    write_checkpoint(ckpt, 4)  # the next save of that step starts from a clean staging folder
    assert ckpt.latest_good()[0] == 4 and not any(p.name.endswith(".partial") for p in ckpt.root.iterdir())


def test_the_manifest_names_the_run_and_every_file_with_its_checksum(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ckpt", identity())
    folder = write_checkpoint(ckpt, 3)
    manifest = read_manifest(folder)
    assert (manifest["run_id"], manifest["run_name"], manifest["step"]) == ("a" * 32, "a", 3)
    assert manifest["fingerprint"] == FINGERPRINT
    assert sorted(manifest["files"]) == [DRIVER_STATE, "policy/weights"]
    for rel, meta in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify_files(folder, manifest)
    # the manifest checks itself: a changed value that still parses is caught
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text.replace('"step": 3', '"step": 5'))
    with pytest.raises(CheckpointError, match="does not match its own checksum"):
        read_manifest(folder)


def test_checksums_need_no_hashlib_file_digest(tmp_path, monkeypatch):
    # hashlib.file_digest came in Python 3.11 and the project supports 3.10: commit and verify
    # must work without it (found by mypy with python_version = 3.10).
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    ckpt = CheckpointDir(tmp_path / "ckpt", identity())
    folder = ckpt.staging(1)
    big = random.Random(0).randbytes(3 * (1 << 20) + 17)  # several read chunks and a partial one
    (folder / "big").write_bytes(big)
    (folder / "empty").write_bytes(b"")
    torch.save({"step": 1}, folder / DRIVER_STATE)
    folder = ckpt.commit(1)
    files = read_manifest(folder)["files"]
    assert files["big"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert files["empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    verify_files(folder, read_manifest(folder))


def test_saving_a_step_again_replaces_this_runs_folder_only(tmp_path):
    ours = CheckpointDir(tmp_path / "ckpt", identity())
    write_checkpoint(ours, 2)
    write_checkpoint(ours, 2)  # a resumed run passing step 2 again
    assert [s for s, _ in ours.committed()] == [2] and sorted(p.name for p in ours.root.iterdir()) == ["step_00000002"]
    theirs = CheckpointDir(tmp_path / "ckpt", identity("b" * 32, "b"))
    before = (ours.root / "step_00000002" / MANIFEST).read_bytes()
    with pytest.raises(CheckpointError, match=r"belongs to another run \(run 'a', id a{32}\)"):
        write_checkpoint(theirs, 2)
    assert (ours.root / "step_00000002" / MANIFEST).read_bytes() == before


def test_resume_fingerprint_sorts_the_fields_a_resume_must_match():
    cfg = validate_config(
        {
            "models": {"policy": {"path": "/models/p"}},
            "data": {"source": "imdb"},
            "algorithm": {"name": "grpo"},
            "rewards": [{"kind": "format"}],
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2},
            "trainer": {"global_batch_size": 4, "micro_batch_size": 2},
        }
    )
    fp = resume_fingerprint(cfg)
    assert fp["layout"] == {
        "algorithm.name": "grpo",
        "algorithm.advantage": "grpo",
        "trainer.zero_stage": 0,  # 'auto' on one rank: the stage the optimizer files are written in
        "resources.policy.num_actors": 1,
    }
    cfg.trainer.offload = True  # auto -> stage 2: other files, so a resume must refuse
    assert resume_fingerprint(cfg)["layout"]["trainer.zero_stage"] == 2
    cfg.trainer.offload = False
    assert fp["model"]["models.policy.path"] == "/models/p" and fp["model"]["models.critic"] is None
    assert fp["data"]["data.source"] == "imdb"
    cfg.trainer.lr = 1.0  # free to change on resume
    assert resume_fingerprint(cfg) == fp
    cfg.models.policy.path = "/models/q"
    assert differences(fp["model"], resume_fingerprint(cfg)["model"]) == [
        "models.policy.path: checkpoint '/models/p', this config '/models/q'"
    ]


def test_resume_and_resume_from_are_exclusive():
    with pytest.raises(ConfigError, match="checkpoint.resume_from starts a new run .*: set one"):
        validate_config(
            {
                "models": {"policy": {"path": "p"}},
                "data": {"source": "imdb"},
                "algorithm": {"name": "sft"},
                "checkpoint": {"resume": True, "resume_from": "runs/a/checkpoints/step_00000002"},
            }
        )


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
