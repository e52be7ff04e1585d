"""The suite's table and target lines from per-part results (no part runs here)."""

from bench.__main__ import gc_rows, target_lines, workload_from


def sync_part(samples_per_s, peaks):
    return {
        "samples_per_s": samples_per_s,
        "trained_samples_per_step": [36.0],
        "generated_tokens_per_step": 900.0,
        "threads": 2.0,
        "micro_batch_rows": 6.0,
    } | {f"peak_rss_mib/{k}": v for k, v in peaks.items()}


def results():
    peaks = {"policy": 3000.0, "reference": 1000.0, "rollout": 2000.0, "driver": 500.0}
    return {
        "sync": {"off": sync_part(1.0, peaks), "on": {"refused": "no field"}},
        "async": {"off": sync_part(1.2, peaks), "on": {"refused": "no field"}},
        "trl": {
            "off": {"samples_per_s": 0.5, "peak_rss_mib": 6000.0, "trained_samples_per_step": [36.0]}
            | {"generated_tokens_per_step": 870.0},
            "on": {"samples_per_s": 0.4, "peak_rss_mib": 4700.0, "trained_samples_per_step": [36.0]}
            | {"generated_tokens_per_step": 880.0},
        },
        "rollout": {"sync_GB_per_s": 0.2},
        "packing": None,
    }


def test_targets_best_against_best_and_memory_at_equal_checkpointing():
    lines = target_lines("smollm2", results())
    assert lines[0] == "- samples/s, best of ours / best of TRL >= 2.5x: 2.40x, not met"  # 1.2 / 0.5
    # ours 6500 MiB (sum of roles) / TRL without checkpointing 6000 MiB
    assert lines[1] == "- peak memory, all our processes / TRL (both with grad checkpointing off) <= 2x: 1.08x, met"
    assert lines[2] == "- weight sync >= 2 GB/s: 0.20 GB/s, not met"
    assert target_lines("tiny", results())[0].startswith("- samples/s, best of ours / best of TRL >= 3x")


def test_missing_figures_are_not_met_and_refusals_show_in_the_table():
    r = results() | {"rollout": None, "trl": {}}
    lines = target_lines("tiny", r)
    assert all(line.endswith("not met") and "no figure" in line for line in lines)
    on = dict(gc_rows({"tiny": results()}, "on"))
    assert on["samples/s: raylhf sync (grad checkpointing on)"] == ["refused"]
    assert on["samples/s: TRL GRPOTrainer (HF generate) (grad checkpointing on)"] == ["0.40"]
    off = dict(gc_rows({"tiny": results()}, "off"))
    assert off["**raylhf sync / TRL samples/s** (grad checkpointing off)"] == ["2.00x"]
    assert off["samples trained per step, each side's own record: raylhf / TRL (grad checkpointing off)"] == ["36 / 36"]
    assert off["peak RSS, all our processes (sum of per-role peaks, sync), MiB (grad checkpointing off)"] == ["6500"]


def test_workload_from_a_preset_with_overrides():
    class Args:
        preset, prompts, samples, max_new_tokens = "large", None, 6, None

    w = workload_from(Args)
    assert (w.prompts, w.samples, w.max_new_tokens) == (16, 6, 128)


def test_parts_left_out_read_not_run_and_failed_parts_failed():
    from bench.__main__ import NOT_RUN, table

    r = results() | {"rollout": NOT_RUN, "packing": None, "others_cores": [0.0]}
    rows = dict(table({"tiny": r}, ["off"]))
    assert rows["weight sync, s (GB/s): torch.save bytes -> FlatWeights (target >= 2 GB/s)"] == ["not run"]
    assert rows["**packed / padded training tokens/s**"] == ["failed"]
    assert rows["samples/s: raylhf sync (grad checkpointing off)"] == ["1.00"]
