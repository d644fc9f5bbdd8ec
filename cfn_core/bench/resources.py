"""Resource use of one timed run: peak memory (PSS), open fds, processes, CPU.

Memory is PSS (proportional set size, ``psutil`` ``memory_full_info().pss``) of
the benchmarking process and every descendant, so pages shared by forked agents
are counted once.  Reading PSS costs ~0.5 ms per process on this machine, so the
sampler thread keeps itself under :data:`DUTY` of one core: each pass measures
new processes first, then the ones measured longest ago, within a time slice;
a process not measured yet counts as the mean of those that were.  CPU is exact:
``os.times()`` of this process plus its reaped children, before and after.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

#: at most this fraction of one core goes to sampling
DUTY = 0.05
#: longest single pass, seconds
SLICE = 0.05
#: shortest pause between passes, seconds
MIN_INTERVAL = 0.02


def cpu_seconds() -> float:
    """User + system seconds of this process and its reaped descendants so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ResourceSampler:
    """Samples this process tree in a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self._pss: dict[tuple[int, float], int] = {}  # (pid, create_time) -> last PSS
        self._measured_at: dict[tuple[int, float], float] = {}
        self.peak_pss = 0
        self.peak_fds = 0
        self.peak_processes = 0
        self.samples = 0
        self.cost = 0.0
        self.estimated = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ResourceSampler":
        self._cpu0 = cpu_seconds()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="cfn-bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop sampling and return the figures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = time.perf_counter() - self._t0
        cpu = cpu_seconds() - self._cpu0
        return {
            "peak_pss_bytes": self.peak_pss or None,
            "pss_estimated": self.estimated,
            "peak_fds": self.peak_fds or None,
            "peak_processes": self.peak_processes,
            "cpu_seconds": cpu,
            "cpu_percent": 100.0 * cpu / wall if wall > 0 else None,
            "samples": self.samples,
            "sampling_seconds": self.cost,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.sample()
            except psutil.Error:
                pass
            spent = time.perf_counter() - t0
            self.cost += spent
            self._stop.wait(max(MIN_INTERVAL, spent * (1 - DUTY) / DUTY))

    def sample(self) -> None:
        """One pass: list the tree, measure what the time slice allows, update the peaks."""
        t0 = time.perf_counter()
        procs = [self.me] + self.me.children(recursive=True)
        live: dict[tuple[int, float], psutil.Process] = {}
        for p in procs:
            try:
                live[(p.pid, p.create_time())] = p
            except psutil.Error:
                continue
        try:
            self.peak_fds = max(self.peak_fds, self.me.num_fds())
        except psutil.Error:
            pass
        self.peak_processes = max(self.peak_processes, len(live) - 1)
        for key in [k for k in self._pss if k not in live]:
            del self._pss[key]
            self._measured_at.pop(key, None)
        # new processes first, then the stalest
        order = sorted(live, key=lambda k: self._measured_at.get(k, -1.0))
        for key in order:
            if self._pss and time.perf_counter() - t0 > SLICE:
                break
            try:
                self._pss[key] = live[key].memory_full_info().pss
                self._measured_at[key] = time.perf_counter()
            except psutil.Error:
                continue
        self.samples += 1
        known = [self._pss[k] for k in live if k in self._pss]
        if not known:
            return
        agents = [self._pss[k] for k in live if k in self._pss and k[0] != self.me.pid]
        missing = sum(1 for k in live if k not in self._pss)
        if missing:
            self.estimated = True
        mean = sum(agents) / len(agents) if agents else 0
        self.peak_pss = max(self.peak_pss, int(sum(known) + missing * mean))
