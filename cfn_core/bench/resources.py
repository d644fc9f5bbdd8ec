"""Resource use of one timed run: peak memory (PSS), open fds, processes, CPU.

Memory is PSS (proportional set size, ``psutil`` ``memory_full_info().pss``) of
the benchmarking process and every descendant, so pages shared by forked agents
are counted once.  Reading PSS costs ~0.5 ms per process on this machine, so
during timed repetitions the sampler thread keeps itself under :data:`DUTY` of
one core: each pass lists the tree, then measures new processes first and the
ones measured longest ago next, within a time slice; a process not measured yet
counts as the mean of those that were.  Such sparse passes can miss the peak of
a cell that lasts a second, so the runner gives fast cells one extra, untimed
repetition sampled without that limit (``ResourceSampler(duty=None)``).  CPU is
exact: ``os.times()`` of this process plus its reaped children, before and after.
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

    def __init__(self, duty: float | None = DUTY, slice_seconds: float = SLICE) -> None:
        """:param duty: most of one core to spend sampling; None: sample back to back."""
        self.duty = duty
        self.slice = slice_seconds
        self.me = psutil.Process()
        self._procs: dict[int, psutil.Process | None] = {}
        self._pss: dict[int, int] = {}  # pid -> last PSS measured
        self._measured_at: dict[int, float] = {}
        self.peak_pss = 0
        self.peak_fds = 0
        self.peak_processes = 0
        self.samples = 0
        self.cost = 0.0
        self.estimated = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # sample() runs in the thread and, on request, in the caller

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
            pause = MIN_INTERVAL if self.duty is None else spent * (1 - self.duty) / self.duty
            self._stop.wait(max(MIN_INTERVAL, pause))

    def sample(self) -> None:
        """One pass: list the tree, measure what the time slice allows, update the peaks.

        Thread-safe: a caller may also take a pass at a moment it knows matters.
        """
        with self._lock:
            try:
                self._sample()
            except psutil.Error:  # a process ended while it was measured
                pass

    def _sample(self) -> None:
        t0 = time.perf_counter()
        pids = process_tree(self.me.pid)
        for pid in [p for p in self._procs if p not in pids]:
            del self._procs[pid]
            self._pss.pop(pid, None)
            self._measured_at.pop(pid, None)
        for pid in pids:
            self._procs.setdefault(pid, None)  # a psutil.Process is made when it is first measured
        self._procs[self.me.pid] = self.me
        try:
            self.peak_fds = max(self.peak_fds, self.me.num_fds())
        except psutil.Error:
            pass
        live = [p for p in pids if p in self._procs]
        self.peak_processes = max(self.peak_processes, len(live) - 1)
        # new processes first, then the stalest
        for pid in sorted(live, key=lambda p: self._measured_at.get(p, -1.0)):
            if self._pss and time.perf_counter() - t0 > self.slice:
                break
            try:
                proc = self._procs[pid]
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                self._pss[pid] = proc.memory_full_info().pss
                self._measured_at[pid] = time.perf_counter()
            except psutil.Error:
                continue
        self.samples += 1
        known = [self._pss[p] for p in live if p in self._pss]
        if not known:
            return
        agents = [self._pss[p] for p in live if p in self._pss and p != self.me.pid]
        missing = sum(1 for p in live if p not in self._pss)
        if missing:
            self.estimated = True
        mean = sum(agents) / len(agents) if agents else 0
        self.peak_pss = max(self.peak_pss, int(sum(known) + missing * mean))


def process_tree(root: int) -> set[int]:
    """``root`` and its descendants, from /proc/PID/task/TID/children (no scan of every process)."""
    if not os.path.exists(f"/proc/{root}/task/{root}/children"):
        try:
            return {root} | {c.pid for c in psutil.Process(root).children(recursive=True)}
        except psutil.Error:
            return {root}
    out, stack = {root}, [root]
    while stack:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for kid in kids:
                k = int(kid)
                if k not in out:
                    out.add(k)
                    stack.append(k)
    return out
