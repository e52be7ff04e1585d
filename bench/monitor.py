"""A background thread that watches this machine while a benchmark runs.

- Peak memory per role: the peak resident set (VmHWM, which the kernel keeps per process, so
  polling cannot miss a short spike) of every Ray actor process started under this process,
  named by its role from its process title (`ray::PolicyActor` -> policy), plus this process.
- Load from others: CPU seconds used by processes outside this process's tree, per wall second,
  so a table can say whether other work shared the cores while it was measured.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil

from bench.stats import peak_kib, role_of


class Monitor:
    def __init__(self, interval_s: float = 1.0, roles: bool = True):
        self.interval_s, self.roles = interval_s, roles
        self.peak_mib: dict[str, float] = {}
        self._cpu_seen: dict[int, float] = {}
        self._others_cpu_s, self._started, self.wall_s = 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._started = time.perf_counter()
        self._poll()  # first reading: CPU counters of everything now running are the baseline
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    @property
    def others_cores(self) -> float:
        """Mean number of cores that processes outside this tree kept busy so far."""
        return self._others_cpu_s / max(self.wall_s, 1e-9)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        self.wall_s = time.perf_counter() - self._started
        me = psutil.Process()
        ours = {me.pid} | {p.pid for p in _children(me)}
        for proc in psutil.process_iter(["pid", "cpu_times"]):
            pid, times = proc.info["pid"], proc.info["cpu_times"]
            if times is None:
                continue
            used = times.user + times.system
            if pid not in ours and pid in self._cpu_seen:
                self._others_cpu_s += max(used - self._cpu_seen[pid], 0.0)
            self._cpu_seen[pid] = used
        if self.roles:
            for pid in ours:
                try:
                    title = " ".join(psutil.Process(pid).cmdline())
                    peak = peak_kib(Path(f"/proc/{pid}/status").read_text())
                except (psutil.Error, OSError):
                    continue  # it ended between listing and reading
                role = "driver" if pid == me.pid else role_of(title)
                if role and peak:
                    self.peak_mib[role] = max(self.peak_mib.get(role, 0.0), peak / 1024)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def own_peak_mib() -> float:
    """This process's peak resident set so far."""
    return (peak_kib(Path(f"/proc/{os.getpid()}/status").read_text()) or 0) / 1024
