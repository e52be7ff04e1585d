"""Threads of the benchmark's processes: set when a part is the main program, never silently 1."""

import os

from bench.threads import default_threads, run_as_main, use_threads


def test_run_as_main_only_for_bench_modules():
    assert run_as_main(["python", "-m", "bench", "--quick"])
    assert run_as_main(["/venv/bin/python", "-m", "bench.rl_step", "--samples", "6"])
    assert not run_as_main(["python", "-m", "pytest", "tests/unit"])
    assert not run_as_main(["python", "-m", "benchmarks"])
    assert not run_as_main(["python", "script.py"])


def test_default_threads_fills_the_unset_variable_from_the_set_one(monkeypatch, capsys):
    monkeypatch.delenv("RAYLHF_CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    assert os.environ["RAYLHF_CPU_THREADS"] == "3"
    assert "RAYLHF_CPU_THREADS unset, set to 3" in capsys.readouterr().err


def test_default_threads_is_all_cores_when_nothing_is_set(monkeypatch, capsys):
    monkeypatch.delenv("RAYLHF_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == (os.cpu_count() or 1)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["RAYLHF_CPU_THREADS"] == str(os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAYLHF_CPU_THREADS", "1")
    capsys.readouterr()
    assert default_threads() == 1 and capsys.readouterr().err == ""  # both set: quiet, unchanged


def test_use_threads_sets_both(monkeypatch):
    import pytest

    monkeypatch.setenv("OMP_NUM_THREADS", "9")
    monkeypatch.setenv("RAYLHF_CPU_THREADS", "9")
    import torch

    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["RAYLHF_CPU_THREADS"] == "1"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads"):
        use_threads(0)
