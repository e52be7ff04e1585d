"""Thread counts of the benchmark's processes: one count for every side, set before torch loads."""

from __future__ import annotations

import os
import sys

THREAD_VARS = ("RAYLHF_CPU_THREADS", "OMP_NUM_THREADS")


def default_threads() -> int:
    """Give every thread variable that is unset the value of the one that is set, else all
    cores; print the choice once (child processes inherit the variables and stay quiet)."""
    given = [os.environ[v] for v in THREAD_VARS if os.environ.get(v)]
    n = int(given[0]) if given else (os.cpu_count() or 1)
    unset = [v for v in THREAD_VARS if not os.environ.get(v)]
    for v in unset:
        os.environ[v] = str(n)
    if unset:
        print(f"[bench] {n} thread(s) per process: {' and '.join(unset)} unset, set to {n}", file=sys.stderr)
    return n


def use_threads(n: int) -> int:
    """Set both thread variables (and torch's count, if torch is loaded) to n; returns n."""
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    for v in THREAD_VARS:
        os.environ[v] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def add_threads_arg(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("RAYLHF_CPU_THREADS") or os.cpu_count() or 1),
        help="torch/OpenMP threads of this part's processes (the system's actors through RAYLHF_CPU_THREADS, "
        "TRL / HF generate / vLLM through OMP_NUM_THREADS); default: $RAYLHF_CPU_THREADS, else all cores",
    )


def run_as_main(argv: list[str] | None = None) -> bool:
    """Whether this process is `python -m bench[.<part>]` (sys.orig_argv: the interpreter's own
    arguments, Python 3.10+), so a test importing bench leaves the environment alone."""
    argv = list(getattr(sys, "orig_argv", [])) if argv is None else argv
    after = argv[argv.index("-m") + 1 :] if "-m" in argv else []
    return bool(after) and (after[0] == "bench" or after[0].startswith("bench."))
