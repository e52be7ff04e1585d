"""Every loop resumes after a crash: SFT, DPO and reward-model training (RL: test_resume_export.py).

Each loop runs through the one driver (actors/driver.py). For each, on the real runtime (local
Ray, DeepSpeed, vLLM for SFT's exact match; tiny models): a run that crashes in step 3, after its
step-2 checkpoint, is resumed with checkpoint.resume=true and must end exactly where a run that
never stopped ends: every step logged once, the same metrics for steps 3 and 4 (the restored
weights, Adam state, LR schedule and data position all feed them), the same held-out metrics
after training and the same exported weights.

Tolerance: none beyond float printing (rel 1e-6 on metrics, exact weights). On CPU with fixed
seeds and the same thread count every operation repeats bit for bit, and the data order of step
k depends only on k; a difference here means something was not restored.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import validate_config
from rlhf.loop import RESULT_KEYS

pytestmark = pytest.mark.integration

STEPS, CRASH_AT = 4, 3
TIMING = ("time",)  # keys that depend on the wall clock, not on what was computed


def base(tmp_path, name: str, **sections) -> dict:
    return {
        "trainer": {
            "zero_stage": 2,
            "lr": 1e-3,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "total_steps": STEPS,
            "scheduler": "linear",
        },
        "checkpoint": {"every_n_steps": 2},
        "logging": {"dir": str(tmp_path), "run_name": name, "tensorboard": False},
        **sections,
    }


def sft_config(tmp_path, model, name, **checkpoint):
    raw = base(
        tmp_path,
        name,
        models={"policy": {"path": model, "dtype": "float32"}},
        # answers: held-out exact match through a vLLM engine, which a resume must hand the restored weights
        data={
            "source": "reasoning_gym:chain_sum",
            "task_kwargs": {"min_terms": 2, "max_terms": 2},
            "train_size": 24,  # 3 steps an epoch: step 4 starts the second epoch's order
            "eval_size": 8,
            "chat_template": "none",
            "max_prompt_len": 64,
            "max_response_len": 8,
        },
        algorithm={"name": "sft"},
        rollout={"max_new_tokens": 8},
        resources={"policy": {"cpus_per_actor": 0.5}, "rollout": {"cpus_per_actor": 0.5}},
    )
    raw["checkpoint"] |= checkpoint
    return validate_config(raw)


def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    if not path.exists():
        rows = [
            {"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
            for a in range(8)
            for b in range(5)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(tmp_path, model, name, **checkpoint):
    raw = base(
        tmp_path,
        name,
        models={"policy": {"path": model, "dtype": "float32"}},
        data={"source": pairs_file(tmp_path), "eval_size": 8, "chat_template": "none", "max_response_len": 8},
        algorithm={"name": "dpo", "dpo": {"beta": 0.1}},
        resources={"policy": {"cpus_per_actor": 0.5}, "reference": {"cpus_per_actor": 0.5}},
    )
    raw["checkpoint"] |= checkpoint
    return validate_config(raw)


def reward_model_config(tmp_path, model, name, **checkpoint):
    raw = base(
        tmp_path,
        name,
        # the tiny causal LM with a fresh scalar head (Qwen2ForSequenceClassification)
        models={"reward": {"path": model, "dtype": "float32"}},
        data={"source": pairs_file(tmp_path), "eval_size": 8, "max_response_len": 8},
        algorithm={"name": "reward_model"},
        resources={"reward": {"cpus_per_actor": 0.5}},
    )
    raw["trainer"]["zero_stage"] = 0  # the other stage the e2e runs use
    raw["checkpoint"] |= checkpoint
    return validate_config(raw)


def crash_and_resume(tmp_path, model, make_config, loop_cls, monkeypatch):
    """(uninterrupted result, resumed result): the second run crashes in step CRASH_AT, then resumes."""
    from actors.launch import run

    uninterrupted = run(make_config(tmp_path, model, "uninterrupted"))
    original = loop_cls.step

    def crash(self, step):
        if step == CRASH_AT:
            raise RuntimeError("injected crash")
        return original(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop_cls, "step", crash)
        with pytest.raises(RuntimeError, match="injected crash"):
            run(make_config(tmp_path, model, "resumed"))
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "stopped"
    resumed = run(make_config(tmp_path, model, "resumed", resume=True))
    return uninterrupted, resumed


def step_metrics(run_dir, key: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows if key in r}


def weights(folder) -> dict[str, torch.Tensor]:
    (file,) = [p for p in Path(folder).iterdir() if p.suffix == ".safetensors"]
    return load_file(file)


def assert_same_run(tmp_path, uninterrupted, resumed, step_key: str, model: str):
    assert tuple(uninterrupted) == tuple(resumed) == RESULT_KEYS  # one result shape for every loop
    assert uninterrupted["steps"] == resumed["steps"] == STEPS
    assert uninterrupted["restarts"] == resumed["restarts"] == 0
    full, again = step_metrics(tmp_path / "uninterrupted", step_key), step_metrics(tmp_path / "resumed", step_key)
    assert sorted(full) == sorted(again) == list(range(1, STEPS + 1))  # every step logged once
    for step in range(CRASH_AT, STEPS + 1):
        assert set(full[step]) == set(again[step])
        for key, value in full[step].items():
            assert again[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
    assert full[1][step_key] != full[STEPS][step_key]  # the steps trained something
    assert resumed["before"] == uninterrupted["before"]  # restored from the checkpoint, not re-measured
    assert resumed["after"] == pytest.approx(uninterrupted["after"], rel=1e-6, abs=1e-7)
    a, b = weights(uninterrupted["final_path"]), weights(resumed["final_path"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    start = weights(model)
    assert any(not torch.equal(a[n], start[n]) for n in a if n in start), "training moved no weight"
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000004"]


def test_sft_resumes_after_a_crash(ray_cluster, tiny_model, tmp_path, monkeypatch, caplog):
    from actors.supervised import SFTLoop

    with caplog.at_level("INFO", "raylhf"):
        uninterrupted, resumed = crash_and_resume(tmp_path, tiny_model, sft_config, SFTLoop, monkeypatch)
    assert "resumed from" in caplog.text and "continuing at step 3" in caplog.text
    assert "eval/exact_match" in resumed["after"]
    assert_same_run(tmp_path, uninterrupted, resumed, "sft_loss", tiny_model)


def test_dpo_resumes_after_a_crash(ray_cluster, tiny_model, tmp_path, monkeypatch):
    from actors.preference import DPOLoop

    uninterrupted, resumed = crash_and_resume(tmp_path, tiny_model, dpo_config, DPOLoop, monkeypatch)
    assert uninterrupted["before"]["eval/preference_accuracy"] == pytest.approx(0.5)  # pi == ref
    assert_same_run(tmp_path, uninterrupted, resumed, "dpo_loss", tiny_model)


def test_reward_model_resumes_after_a_crash(ray_cluster, tiny_model, tmp_path, monkeypatch):
    from actors.preference import RewardModelLoop

    uninterrupted, resumed = crash_and_resume(tmp_path, tiny_model, reward_model_config, RewardModelLoop, monkeypatch)
    assert "eval/pairwise_accuracy" in resumed["after"]
    assert_same_run(tmp_path, uninterrupted, resumed, "rm_loss", tiny_model)
