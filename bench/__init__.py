"""The benchmark suite (python -m bench; see bench/__main__.py and docs/benchmarks.md).

Threads are explicit in every part, run in the suite or alone: when a bench module is the main
program (`python -m bench` or `python -m bench.<part>`), importing this package, which happens
before the part imports torch, sets RAYLHF_CPU_THREADS (the system's model actors) and
OMP_NUM_THREADS (the direct vLLM engine, HF generate, TRL) to all cores unless they are set, and
says so on stderr. Without this a part run on its own gave the system's actors Ray's default of
1 thread (their CPU share) while `python -m bench` gave all cores. Parts with a `--threads` flag
set both from it (bench.threads.use_threads). Importing bench from elsewhere (tests) changes
nothing.
"""

from bench.threads import default_threads, run_as_main

if run_as_main():
    default_threads()
