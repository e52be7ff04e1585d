"""The evaluator on the real runtime (local Ray, vLLM, DeepSpeed on CPU, a tiny model): the
command line on a config, and the judges, sample files and alarm in a run's held-out evaluation."""

import json

import pytest

from rlhf.config import validate_config

pytestmark = pytest.mark.integration


def tiny_config(tiny_model, tmp_path, **eval_cfg):
    return {
        "models": {"policy": {"path": tiny_model, "dtype": "float32"}},
        "data": {
            "source": "reasoning_gym:chain_sum",
            "task_kwargs": {"min_terms": 2, "max_terms": 2},
            "train_size": 16,
            "eval_size": 4,
            "chat_template": "none",
            "max_prompt_len": 64,
        },
        "algorithm": {"name": "grpo", "advantage": "grpo"},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "eval_samples": 2},
        "rewards": [{"kind": "reasoning_gym"}],
        "trainer": {"zero_stage": 2, "global_batch_size": 4, "micro_batch_size": 4, "total_steps": 1},
        "resources": {"policy": {"cpus_per_actor": 0.5}, "rollout": {"cpus_per_actor": 0.5}},
        "logging": {"dir": str(tmp_path), "run_name": "tiny", "tensorboard": False},
        "eval": eval_cfg,
    }


def test_command_line_evaluates_start_and_a_folder(ray_cluster, tiny_model, tmp_path):
    import yaml

    from recipes.evaluate import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model, tmp_path)))
    out = tmp_path / "eval"
    summary = main(["--config", str(config), "--model", "start", "--model", tiny_model, "--out", str(out)])
    start = summary["models"]["start"]["metrics"]
    assert summary["judges"] == ["exact_match"] and summary["prompts"] == 4
    for key in ("reward/reasoning_gym", "judge/exact_match", "sampled/judge/exact_match", "health/distinct_2"):
        assert key in start
    assert "sampled/pass@2/exact_match" in start and start["reward_errors/reasoning_gym"] == 0.0
    records = [json.loads(line) for line in (out / "samples-start.jsonl").read_text().splitlines()]
    assert len(records) == 4 + 4 * 2 and {r["mode"] for r in records} == {"greedy", "sampled"}
    assert all("exact_match" in r["judges"] and r["answer"] for r in records)
    # the same weights twice: greedy answers, hence every paired difference, are exactly 0
    (diff,) = summary["paired"].values()
    assert diff["reward"].startswith("+0 ± 0") and diff["judge/exact_match"].startswith("+0 ± 0")
    # and the sampled pass (fixed seed), paired on each prompt's mean over its 2 answers
    assert diff["sampled/reward"].startswith("+0 ± 0") and "n=4" in diff["sampled/judge/exact_match"]


def test_run_evaluation_reports_judges_writes_samples_and_keeps_the_best(ray_cluster, tiny_model, tmp_path):
    from actors.coordinator import RLCoordinator
    from rlhf.data.sources import load_prompts

    cfg = validate_config(tiny_config(tiny_model, tmp_path, judges=["exact_match"], alarm_action="keep_best"))
    coordinator = RLCoordinator(cfg)
    try:
        heldout = load_prompts(cfg.data, "eval")
        first, second = coordinator.evaluate(heldout), coordinator.evaluate(heldout)
    finally:
        coordinator.shutdown()
    assert "eval/judge/exact_match" in first and "eval/sampled/judge/exact_match" in first
    assert first["eval/hacking_alarm"] == 0.0 and second["eval/hacking_alarm"] == 0.0  # same weights
    run = tmp_path / "tiny"
    assert len((run / "samples" / "eval-00000.jsonl").read_text().splitlines()) == 4 + 4 * 2
    assert (run / "best-by-judge" / "config.json").is_file()


def test_a_checkpoint_is_verified_and_exported_for_evaluation(ray_cluster, tiny_model, tmp_path):
    import torch

    from actors.coordinator import RLCoordinator
    from recipes.evaluate import resolve_model
    from rlhf.checkpoint import DRIVER_STATE, CheckpointDir, RunIdentity, resume_fingerprint
    from rlhf.config import ConfigError

    cfg = validate_config(tiny_config(tiny_model, tmp_path))
    checkpoints = CheckpointDir(
        tmp_path / "checkpoints", RunIdentity("0123456789abcdef", "tiny", resume_fingerprint(cfg))
    )
    coordinator = RLCoordinator(cfg)
    try:
        folder = checkpoints.staging(1)
        torch.save(coordinator.save_checkpoint(folder) | {"step": 1}, folder / DRIVER_STATE)
        published = checkpoints.commit(1)
    finally:
        coordinator.shutdown()
    label, path = resolve_model(cfg, str(published))
    assert label.endswith("step_00000001") and (tmp_path / path / "config.json").is_file()
    next((published / "policy").rglob("*.pt")).write_bytes(b"not the saved bytes")  # tampered
    with pytest.raises(ConfigError, match="not a sound checkpoint"):
        resolve_model(cfg, str(published))
