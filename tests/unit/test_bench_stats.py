"""The benchmark suite's pure helpers: step-time breakdown, role names, peak memory parsing."""

import pytest

from bench.stats import peak_kib, role_of, step_breakdown, step_walls


def test_step_walls_are_differences_of_the_run_clock():
    assert step_walls([10.0, 13.0, 17.5]) == [10.0, 3.0, 4.5]


def test_breakdown_leaves_out_the_first_step_and_takes_medians():
    phases = lambda g, t: {
        "time/generate": g,
        "time/score": 0.5,
        "time/reference": 1.0,
        "time/train": t,
        "time/sync": 0.5,
    }
    metrics = [phases(50.0, 50.0), phases(4.0, 3.0), phases(5.0, 4.0), phases(6.0, 5.0)]
    walls = [200.0, 10.0, 12.0, 14.0]  # the warm-up step's 200 s must not count
    out = step_breakdown(walls, metrics)
    assert out["step"] == 12.0 and out["generate"] == 5.0 and out["train"] == 4.0
    # other = wall - phases: 10-9, 12-11, 14-13 -> 1 s each step
    assert out["other"] == pytest.approx(1.0)
    assert out["other_share"] == pytest.approx(1 / 12)
    assert out["steps_measured"] == 3


def test_breakdown_counts_a_missing_phase_as_zero_and_needs_a_step_after_warm_up():
    out = step_breakdown([1.0, 2.0], [{}, {"time/generate": 1.5}])
    assert out["reference"] == 0.0 and out["other"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warm-up"):
        step_breakdown([1.0], [{}])


def test_role_of_process_title():
    assert role_of("ray::PolicyActor.train_step()") == "policy"
    assert role_of("ray::RolloutWorker") == "rollout"
    assert role_of("ray::ReferenceActor.compute_logprobs()") == "reference"
    assert role_of("ray::IDLE") is None
    assert role_of("/usr/bin/python -m bench") is None


def test_peak_kib_from_proc_status():
    status = "Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n"
    assert peak_kib(status) == 123456
    assert peak_kib("Name:\tkthreadd\n") is None


def test_forwards_table_gives_speed_ups_over_the_first_forward():
    from bench.__main__ import forwards_table

    def run(step, train, ref, skipped=None):
        r = {"time/step": step, "time/train": train, "time/reference": ref, "samples_per_s": 32 / step}
        r |= {"peak_rss_mib/policy": 6000.0, "peak_rss_mib/reference": 1500.0}
        return r | ({"shared_prompt/tokens_skipped": skipped} if skipped is not None else {})

    runs = {"old": run(30.0, 20.0, 6.0), "new": run(15.0, 10.0, 2.0, 0.55), "x": None}
    lines = forwards_table({"smollm2": {"off": runs}})
    assert "| 1.00x / 1.00x / 1.00x |" in lines[2]
    assert "| smollm2 | off | new |" in lines[3]
    assert "| 2.00x / 2.00x / 3.00x | 2.13 | 55% | 6000 / 1500 |" in lines[3]
    assert "| x | failed |" in lines[4]


def test_forwards_table_names_refused_runs_and_a_missing_base():
    from bench.__main__ import forwards_table

    ok = {"time/step": 10.0, "time/train": 5.0, "time/reference": 1.0, "samples_per_s": 3.2}
    ok |= {"peak_rss_mib/policy": 6000.0, "peak_rss_mib/reference": 1500.0}
    runs = {"old": {"refused": "--grad-checkpointing on: no trainer field"}, "new": ok}
    lines = forwards_table({"tiny": {"on": runs}})
    assert "| tiny | on | old | refused |" in lines[2]
    assert "| n/a (no base run) | 3.20 |" in lines[3]
