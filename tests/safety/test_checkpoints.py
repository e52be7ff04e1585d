"""Attacks on checkpoints and run folders (issue 14, item 2), on real files through the real code.

Each run below does to its folders what a training run does (claims a run folder, writes
checkpoints through CheckpointDir: staging, driver.pt, manifest, rename, pruning), minus the
training, so no Ray starts. The attacks: two runs sharing one checkpoint folder, another run's
checkpoint in this run's folder, a truncated and a bit-flipped file, a changed model or layout,
a new run on a finished run's name, two processes on one run folder. Each must end in a reported
fallback or a clear error, with every run's files intact.
"""

import hashlib
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from actors.launch import main, resume_point, run_checkpoints
from rlhf.checkpoint import DRIVER_STATE, MANIFEST, CheckpointDir, CheckpointError, read_manifest
from rlhf.config import apply_override, dump_config, validate_config
from rlhf.run_folder import RUN_FILE, RunFolderError, open_run_folder

WEIGHTS = "policy/state/mp_rank_00_model_states.pt"


def config(tmp_path, model, name: str, **overrides):
    raw = {
        "models": {"policy": {"path": str(model)}},
        "data": {"source": "reasoning_gym:chain_sum", "train_size": 8, "eval_size": 0},
        "algorithm": {"name": "grpo"},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2},
        "rewards": [{"kind": "reasoning_gym"}],
        "trainer": {"global_batch_size": 4, "micro_batch_size": 2, "total_steps": 4},
        "checkpoint": {"keep_last": 3},
        "logging": {"dir": str(tmp_path / "runs"), "run_name": name, "tensorboard": False},
    }
    for key, value in overrides.items():
        apply_override(raw, f"{key}={value}")
    return validate_config(raw)


@contextmanager
def opened(cfg):
    """The run's folder and checkpoints, as run() opens them (nothing begun, nothing written)."""
    folder = open_run_folder(cfg.logging.dir, cfg.logging.run_name, resume=cfg.checkpoint.resume)
    try:
        yield folder, run_checkpoints(cfg, folder)
    finally:
        folder.close()


def fake_run(cfg, steps) -> tuple[Path, CheckpointDir]:
    """A run that saves checkpoints at `steps` and finishes (random 'weights' instead of training)."""
    with opened(cfg) as (folder, checkpoints):
        folder.begin()
        (folder.path / "config.yaml").write_text(dump_config(cfg))
        for step in steps:
            staged = checkpoints.staging(step)
            (staged / WEIGHTS).parent.mkdir(parents=True)
            torch.save({"w": torch.randn(64, 64)}, staged / WEIGHTS)
            torch.save({"step": step, "data_position": step}, staged / DRIVER_STATE)
            checkpoints.commit(step)
        folder.update(status="finished")
    return folder.path, checkpoints


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots: equal snapshots = nothing written, moved or deleted."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def steps(checkpoints: CheckpointDir) -> list[int]:
    return [s for s, _ in checkpoints.committed()]


def main_exits_with(argv_cfg, tmp_path, capsys, *overrides) -> str:
    """Run the recipe entry point on `argv_cfg` (+ dotted overrides); its exit status 2 and message."""
    file = tmp_path / f"{argv_cfg.logging.run_name}.yaml"
    file.write_text(yaml.safe_dump(argv_cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exited:
        main(str(file), ["--config", str(file), *overrides])
    assert exited.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------- two runs, one folder
def test_two_runs_sharing_a_checkpoint_dir_each_keep_to_their_own(tmp_path, tiny_model):
    shared = tmp_path / "shared"
    a_dir, a = fake_run(
        config(tmp_path, tiny_model, "a", **{"checkpoint.dir": shared, "checkpoint.keep_last": 2}), [1, 2, 3]
    )
    a_files = snapshot(a.root)
    _b_dir, b = fake_run(
        config(tmp_path, tiny_model, "b", **{"checkpoint.dir": shared, "checkpoint.keep_last": 2}), [1, 2, 3, 4]
    )
    assert a.root.parent == b.root.parent == shared.resolve() and a.root != b.root  # a folder per run
    assert snapshot(a.root) == a_files and steps(a) == [2, 3] and steps(b) == [3, 4]
    resumed = config(tmp_path, tiny_model, "a", **{"checkpoint.dir": shared, "checkpoint.resume": "true"})
    with opened(resumed) as (folder, checkpoints):
        assert folder.path == a_dir and resume_point(resumed, checkpoints, restarted=False) == (
            3,
            a.root / "step_00000003",
        )


def test_two_runs_in_one_checkpoint_root_neither_prunes_nor_replaces_the_others(tmp_path, tiny_model):
    """Even pointed at the very same folder (no per-run subfolder), a run deletes, replaces and
    resumes only checkpoints whose manifest names it."""
    _, a = fake_run(config(tmp_path, tiny_model, "a", **{"checkpoint.keep_last": 2}), [1, 2, 3])
    with opened(config(tmp_path, tiny_model, "b", **{"checkpoint.keep_last": 2})) as (_, b):
        b = CheckpointDir(a.root, b.run, keep_last=2)  # b writes into a's checkpoint folder
        a_files = snapshot(a.root)
        for step in (4, 5, 6):
            staged = b.staging(step)
            torch.save({"step": step}, staged / DRIVER_STATE)
            b.commit(step)
        assert steps(a) == [2, 3, 5, 6]  # b kept its newest 2 and left a's alone
        assert all(snapshot(a.root)[k] == v for k, v in a_files.items())
        torch.save({"step": 3}, b.staging(3) / DRIVER_STATE)
        with pytest.raises(CheckpointError, match=r"step_00000003 belongs to another run \(run 'a', id "):
            b.commit(3)
        assert all(snapshot(a.root)[k] == v for k, v in a_files.items())
        assert a.latest_good() == (3, a.root / "step_00000003") and b.latest_good() == (6, a.root / "step_00000006")


def test_resuming_another_runs_checkpoint_is_refused_naming_it_and_resume_from_takes_it(
    tmp_path, tiny_model, capsys, caplog
):
    _, a = fake_run(config(tmp_path, tiny_model, "a"), [2])
    b_dir, b = fake_run(config(tmp_path, tiny_model, "b"), [])
    shutil.copytree(a.root / "step_00000002", b.root / "step_00000002")  # a's checkpoint in b's folder
    before = snapshot(b_dir, a.root)
    err = main_exits_with(config(tmp_path, tiny_model, "b"), tmp_path, capsys, "checkpoint.resume=true")
    assert (
        f"holds no checkpoint of this run ('b', id {b.run.run_id}); the newest there, step_00000002, belongs to "
        f"another run (run 'a', id {a.run.run_id})" in err
    )
    assert f"checkpoint.resume_from={b.root / 'step_00000002'}" in err
    assert snapshot(b_dir, a.root) == before
    # pointed at on purpose: a new run starts from it
    on_purpose = config(tmp_path, tiny_model, "c", **{"checkpoint.resume_from": a.root / "step_00000002"})
    with caplog.at_level(logging.INFO, "raylhf"), opened(on_purpose) as (_, c):
        assert resume_point(on_purpose, c, restarted=False) == (2, a.root / "step_00000002")
    assert "starting from step 2 of" in caplog.text and "run 'a'" in caplog.text


# ------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize(
    "damage, reason",
    [
        (truncate, r"is \d+ bytes, the manifest says \d+ \(truncated or overwritten\)"),
        (flip_a_bit, "does not match its sha256 in the manifest"),
    ],
)
@pytest.mark.parametrize("file", [WEIGHTS, DRIVER_STATE, MANIFEST])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model, caplog, damage, reason, file):
    cfg = config(tmp_path, tiny_model, "a")
    _, checkpoints = fake_run(cfg, [1, 2, 3])
    damage(checkpoints.root / "step_00000003" / file)
    before = snapshot(checkpoints.root)
    resumed = config(tmp_path, tiny_model, "a", **{"checkpoint.resume": "true"})
    with caplog.at_level(logging.WARNING, "raylhf"), opened(resumed) as (_, again):
        assert resume_point(resumed, again, restarted=False) == (2, checkpoints.root / "step_00000002")
    if file == MANIFEST:
        reason = r"manifest.json (is unreadable|does not match its own checksum)"
    assert len(re.findall(f"step_00000003 is damaged, skipped: .*{reason}", caplog.text)) == 1
    assert "resuming from" in caplog.text and "skipped 1 damaged newer one(s)" in caplog.text
    assert snapshot(checkpoints.root) == before  # the damaged one is kept, for a look


def test_no_intact_checkpoint_is_a_clear_error_that_changes_nothing(tmp_path, tiny_model, capsys):
    run_dir, checkpoints = fake_run(config(tmp_path, tiny_model, "a"), [1, 2])
    truncate(checkpoints.root / "step_00000002" / WEIGHTS)
    flip_a_bit(checkpoints.root / "step_00000001" / DRIVER_STATE)
    before = snapshot(run_dir)
    err = main_exits_with(config(tmp_path, tiny_model, "a"), tmp_path, capsys, "checkpoint.resume=true")
    assert err.startswith(f"error: no intact checkpoint of run 'a' in {checkpoints.root}: step_00000002: {WEIGHTS} is ")
    assert f"step_00000001: {DRIVER_STATE} does not match its sha256" in err and "Traceback" not in err
    assert snapshot(run_dir) == before  # run.json, config.yaml and every checkpoint as they were


def test_a_restart_with_only_damaged_checkpoints_stops_rather_than_start_over(tmp_path, tiny_model):
    _, checkpoints = fake_run(config(tmp_path, tiny_model, "a"), [1])
    flip_a_bit(checkpoints.root / "step_00000001" / WEIGHTS)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resume_point(config(tmp_path, tiny_model, "a"), checkpoints, restarted=True)


# ----------------------------------------------------------------------------- compatibility
def test_a_changed_model_or_layout_is_refused_and_resume_from_loads_a_changed_model_on_purpose(
    tmp_path, tiny_model, caplog
):
    _, checkpoints = fake_run(config(tmp_path, tiny_model, "a"), [2])
    step2 = checkpoints.root / "step_00000002"
    for change, named in [
        (
            {"models.policy.path": "/elsewhere/model"},
            f"models.policy.path: checkpoint '{tiny_model}', this config '/elsewhere/model'",
        ),
        ({"trainer.zero_stage": 3}, "trainer.zero_stage: checkpoint 0, this config 3"),
        ({"data.seed": 7}, "data.seed: checkpoint 0, this config 7"),
    ]:
        cfg = config(tmp_path, tiny_model, "a", **{"checkpoint.resume": "true"}, **change)
        with opened(cfg) as (_, again), pytest.raises(CheckpointError) as refused:
            resume_point(cfg, again, restarted=False)
        assert f"cannot resume from {step2}: it was written under a different config ({named})" in str(refused.value)
        assert f"checkpoint.resume_from={step2}" in str(refused.value)
    moved = config(
        tmp_path, tiny_model, "b", **{"checkpoint.resume_from": step2, "models.policy.path": "/elsewhere/model"}
    )
    with caplog.at_level(logging.WARNING, "raylhf"), opened(moved) as (_, b):
        assert resume_point(moved, b, restarted=False) == (2, step2)
    assert "differs from this config, loaded on purpose: models.policy.path" in caplog.text
    resharded = config(tmp_path, tiny_model, "c", **{"checkpoint.resume_from": step2, "trainer.zero_stage": 3})
    with (
        opened(resharded) as (_, c),
        pytest.raises(
            CheckpointError,
            match="cannot load into this config "
            r"\(trainer.zero_stage: checkpoint 0, this config 3\)",
        ),
    ):
        resume_point(resharded, c, restarted=False)


def test_a_damaged_or_missing_resume_from_is_refused_and_leaves_no_folder(tmp_path, tiny_model, capsys):
    _, checkpoints = fake_run(config(tmp_path, tiny_model, "a"), [2])
    step2 = checkpoints.root / "step_00000002"
    flip_a_bit(step2 / WEIGHTS)
    err = main_exits_with(config(tmp_path, tiny_model, "b", **{"checkpoint.resume_from": step2}), tmp_path, capsys)
    assert f"error: checkpoint.resume_from={step2}: the checkpoint is damaged: {WEIGHTS} does not match" in err
    err = main_exits_with(
        config(tmp_path, tiny_model, "b", **{"checkpoint.resume_from": checkpoints.root}), tmp_path, capsys
    )
    assert "is a folder of checkpoints: name one step_<k> folder inside it" in err
    assert not (tmp_path / "runs" / "b").exists()  # a run refused before it began leaves nothing behind


# -------------------------------------------------------------------------------- run folders
def test_a_new_run_never_overwrites_a_finished_runs_folder(tmp_path, tiny_model, caplog):
    first, _ = fake_run(config(tmp_path, tiny_model, "a"), [1])
    before = snapshot(first)
    with caplog.at_level(logging.WARNING, "raylhf"):
        second, _ = fake_run(config(tmp_path, tiny_model, "a"), [1])
    third, _ = fake_run(config(tmp_path, tiny_model, "a"), [])
    assert (first.name, second.name, third.name) == ("a", "a-2", "a-3")
    assert snapshot(first) == before
    assert f"{first} already holds run " in caplog.text and f"this new run writes to {second} instead" in caplog.text
    runs = [read_manifest(p / "checkpoints" / "step_00000001")["run_id"] for p in (first, second)]
    assert runs[0] != runs[1]


def test_a_supervised_run_never_resumes_another_loops_checkpoint(tmp_path, tiny_model):
    """Every loop checkpoints and resumes (actors/driver.py); the layout fingerprint keeps one
    loop's checkpoint out of another (an SFT resume over a GRPO run's folder is refused)."""
    fake_run(config(tmp_path, tiny_model, "a"), [2])
    sft = config(tmp_path, tiny_model, "a", **{"algorithm.name": "sft", "checkpoint.resume": "true"})
    with opened(sft) as (_, again), pytest.raises(CheckpointError) as refused:
        resume_point(sft, again, restarted=False)
    assert "algorithm.name: checkpoint 'grpo', this config 'sft'" in str(refused.value)


def test_two_processes_never_share_a_run_folder(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "a", **{"checkpoint.resume": "true"})
    with opened(cfg) as (live, _):
        live.begin()
        with pytest.raises(
            RunFolderError, match=r"runs/a is in use by another live run \(run [0-9a-f]{32}, status running"
        ):
            open_run_folder(cfg.logging.dir, "a", resume=True)
        elsewhere = open_run_folder(cfg.logging.dir, "a", resume=False)  # a new run goes elsewhere
        elsewhere.close()
        assert elsewhere.name == "a-2"
    open_run_folder(cfg.logging.dir, "a", resume=True).close()  # free again once the first ends


def test_a_folder_that_is_not_a_run_is_not_resumed(tmp_path):
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match=f"has no {RUN_FILE}, so it is not a run this version wrote"):
        open_run_folder(tmp_path / "runs", "old", resume=True)
    folder = open_run_folder(tmp_path / "runs", "old", resume=False)
    folder.close()
    assert folder.name == "old-2" and (tmp_path / "runs" / "old" / "metrics.jsonl").read_text() == "{}\n"
