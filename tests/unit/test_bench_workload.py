"""The benchmark's workload rules: sizes each side can honour, micro-batches derived from the
size, trained-sample accounting, the settings table and the target lines."""

import pytest

from bench.workload import (
    PRESETS,
    Workload,
    WorkloadError,
    micro_batch_rows,
    settings_header,
    settings_rows,
    side_settings,
    target_line,
    trained_samples_per_s,
    validate,
)


@pytest.mark.parametrize("batch, rows", [(32, 8), (36, 6), (20, 5), (7, 7), (11, 1), (128, 8), (12, 6), (2, 2), (1, 1)])
def test_micro_batch_rows_is_the_largest_divisor_up_to_eight(batch, rows):
    assert micro_batch_rows(batch) == rows
    assert batch % rows == 0  # every sample of the step in exactly one micro-batch


def test_every_size_up_to_a_large_one_has_whole_micro_batches():
    for batch in range(1, 300):
        rows = micro_batch_rows(batch)
        assert 1 <= rows <= 8 and batch % rows == 0
        # no larger divisor <= 8 was passed over
        assert not any(batch % d == 0 for d in range(rows + 1, min(8, batch) + 1))


def test_the_reviewers_size_and_the_presets_are_valid():
    for w in [Workload(6, 6, 48), Workload(5, 4, 32), *PRESETS.values()]:
        validate(w, max_positions=512, steps=4)
    assert PRESETS["today"] == Workload(8, 4, 32) and PRESETS["large"] == Workload(16, 8, 128)
    assert PRESETS["large"].batch == 128


@pytest.mark.parametrize(
    "w, kwargs, names",
    [
        (Workload(0, 4, 32), {}, "--prompts"),
        (Workload(8, 1, 32), {}, "--samples"),
        (Workload(8, 4, 0), {}, "--max-new-tokens"),
        (Workload(300, 4, 32), {}, "--prompts"),
        (Workload(8, 4, 400), {"max_positions": 512}, "--max-new-tokens"),
        (Workload(8, 4, 32), {"steps": 1}, "--steps"),
    ],
)
def test_a_size_a_side_cannot_honour_is_refused_naming_the_setting(w, kwargs, names):
    with pytest.raises(WorkloadError, match=names):
        validate(w, **kwargs)


def test_context_limit_is_inclusive():
    validate(Workload(8, 4, 384), max_positions=512)  # 128 prompt + 384 new = 512 fits


def test_samples_per_s_counts_trained_samples():
    w = Workload(6, 6, 48)
    assert trained_samples_per_s("ours", w, [2.0, 4.0, 3.0], [36.0, 36.0, 36.0]) == pytest.approx(12.0)


def test_a_step_that_trained_fewer_samples_is_refused_not_counted():
    # the reviewer's case: 5 x 4 = 20 samples, TRL trained 16 per step with micro-batches of 8
    w = Workload(5, 4, 32)
    with pytest.raises(WorkloadError, match=r"TRL: .*20 samples per step.*#2 trained 16"):
        trained_samples_per_s("TRL", w, [1.0, 1.0], [20.0, 16.0])
    with pytest.raises(WorkloadError, match="ours"):
        trained_samples_per_s("ours", w, [1.0], [0.0])  # a skipped step trained nothing
    with pytest.raises(WorkloadError, match="step times"):
        trained_samples_per_s("ours", w, [1.0, 1.0], [20.0])


def test_settings_rows_put_the_differences_first():
    rows = settings_rows({"precision": "fp32", "threads": "2", "ckpt": "off"}, {"precision": "fp32", "ckpt": "on"})
    assert rows[:2] == [("threads", "2", "-", True), ("ckpt", "off", "on", True)]
    assert rows[2] == ("precision", "fp32", "fp32", False)
    header = settings_header(rows)
    assert "differ between the sides: threads: ours 2, TRL -; ckpt: ours off, TRL on." in header
    assert "share: precision fp32." in header
    assert "differ between the sides: none" in settings_header(settings_rows({"a": "1"}, {"a": "1"}))


def test_side_settings_read_each_sides_own_record():
    record = {
        "threads": 2.0,
        "micro_batch_rows": 6.0,
        "trained_samples_per_step": [36.0, 36.0],
        "grad_checkpointing": "on",
    }
    out = side_settings({"precision": "fp32"}, {"on": record, "off": None})
    assert out == {
        "precision": "fp32",
        "gradient checkpointing": "on, off failed",
        "torch threads per process": "2",
        "micro-batch rows": "6",
        "samples trained per step (own record)": "36",
    }
    refused = side_settings({}, {"off": record | {"grad_checkpointing": "off"}, "on": {"refused": "no field"}})
    assert refused["gradient checkpointing"] == "off, on refused"
    assert side_settings({}, {})["gradient checkpointing"] == "not run"


def test_target_lines_say_met_or_not_met():
    assert target_line("samples/s", 2.6, 2.5, True) == "- samples/s >= 2.5x: 2.60x, met"
    assert target_line("samples/s", 1.04, 2.5, True).endswith("1.04x, not met")
    assert target_line("memory", 3.1, 2.0, False) == "- memory <= 2x: 3.10x, not met"
    assert target_line("memory", 2.0, 2.0, False).endswith("met")
    assert "no figure" in target_line("sync", None, 2.0, True, unit=" GB/s")
    assert target_line("sync", 0.25, 2.0, True, unit=" GB/s") == "- sync >= 2 GB/s: 0.25 GB/s, not met"


@pytest.mark.parametrize("prompts, samples", [(6, 6), (5, 4), (7, 2), (11, 3), (16, 8)])
def test_our_config_accepts_every_valid_size_with_derived_micro_batches(tmp_path, prompts, samples):
    from types import SimpleNamespace

    from bench.rl_step import workload_config

    args = SimpleNamespace(
        prompts=prompts, samples=samples, max_new_tokens=48, steps=4, grad_checkpointing="off", dtype="fp32", lora=False
    )
    cfg = workload_config(str(tmp_path), args, str(tmp_path / "run"))
    assert cfg.trainer.global_batch_size == prompts * samples
    assert cfg.trainer.micro_batch_size == micro_batch_rows(prompts * samples)
    assert cfg.rollout.max_new_tokens == cfg.data.max_response_len == 48
    assert cfg.models.policy.dtype == "float32" and cfg.models.policy.lora is None


def test_bf16_and_lora_reach_our_config(tmp_path):
    from types import SimpleNamespace

    from bench.rl_step import LORA, workload_config

    args = SimpleNamespace(
        prompts=8, samples=4, max_new_tokens=32, steps=4, grad_checkpointing="on", dtype="bf16", lora=True
    )
    cfg = workload_config(str(tmp_path), args, str(tmp_path / "run"))
    assert cfg.models.policy.dtype == "bfloat16" and cfg.models.reference is None  # the reference follows the policy
    assert (cfg.models.policy.lora.rank, cfg.models.policy.lora.alpha) == (LORA["rank"], LORA["alpha"])
    assert cfg.trainer.gradient_checkpointing


def test_trl_lora_targets_are_our_config_default():
    from bench.trl_grpo import LORA_TARGETS
    from rlhf.config import LoraConfig

    assert LoraConfig().target_modules == LORA_TARGETS


def test_suite_dtype_auto_is_what_a_run_would_pick(monkeypatch):
    import rlhf.models
    from bench.__main__ import resolve_dtype

    assert resolve_dtype("fp32") == "fp32" and resolve_dtype("bf16") == "bf16"
    monkeypatch.setattr(rlhf.models, "preferred_dtype", lambda: "bfloat16")
    assert resolve_dtype("auto") == "bf16"
    monkeypatch.setattr(rlhf.models, "preferred_dtype", lambda: "float32")
    assert resolve_dtype("auto") == "fp32"
