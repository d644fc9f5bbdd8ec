"""Adaptive spawn window: halve it while the machine is under pressure, double it back when calm.

Signals, sampled at most every 100 ms during a burst: machine CPU use since
the previous sample (``psutil.cpu_percent``, the only one that reacts within a
sub-second burst), the 1-minute load average per CPU (slow, but it catches a
machine that was already busy), and available memory from /proc/meminfo.
A burst starts at the floor (4 agents per CPU) and doubles up to
``parallelism`` at every calm sample; CPU or load pressure halves the window
down to the floor (spawning never stalls because of CPU alone); memory
pressure drops it to one agent at a time.

CPU and load count only while agents are slow to become ready (the oldest one
still starting was launched more than a tenth of ``[parallel] timeout`` ago):
the window exists so that fresh interpreters starved of CPU do not time out,
and agents forked by a zygote are ready within milliseconds on a machine busy
with anything.  Holding those back only serialized the coordinator's launches
(a 500-agent pool took 13% more CPU and 1.4x the wall time with the window
stuck at the floor on a loaded machine).
"""

from __future__ import annotations

import os
import time

import psutil

_SAMPLE_EVERY = 0.1
#: an agent still starting after this fraction of [parallel] timeout is slow to become ready
_SLOW_FRACTION = 0.1


def memory_available_percent() -> float:
    """MemAvailable / MemTotal in percent (psutil's figure when /proc/meminfo lacks them)."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    fields[key] = int(rest.split()[0])
    except OSError:
        pass
    if len(fields) == 2 and fields["MemTotal"]:
        return 100.0 * fields["MemAvailable"] / fields["MemTotal"]
    return 100.0 - psutil.virtual_memory().percent


class Throttle:
    """The window of one spawn burst, plus what it saw."""

    def __init__(self, settings, metrics=None):
        self.s = settings
        self.ncpu = os.cpu_count() or 1
        self.floor = min(settings.parallelism, settings.min_window or 4 * self.ncpu)
        self.window = settings.parallelism
        self.metrics = metrics
        self.next_sample = 0.0
        self.engaged = 0  # samples under pressure
        self.min_window = settings.parallelism
        self.cpu: list[float] = []
        self.load: list[float] = []
        self.memory_low = 0

    def begin(self) -> None:
        # slow start: the floor first, doubled at every calm sample (a burst of 50 fresh
        # interpreters on a busy machine makes each one slow enough to time out)
        self.window = self.floor if self.s.throttle else self.s.parallelism
        psutil.cpu_percent(None)  # start the CPU measurement interval
        self.next_sample = time.monotonic() + _SAMPLE_EVERY

    def current(self, now: float, oldest_starting: float | None = None) -> int:
        """The window now.  ``oldest_starting``: when the oldest agent still starting was launched (None: none is)."""
        if not self.s.throttle:
            return self.s.parallelism
        if now < self.next_sample:
            return self.window
        self.next_sample = now + _SAMPLE_EVERY
        cpu = psutil.cpu_percent(None)
        load = os.getloadavg()[0]
        self.cpu.append(cpu)
        self.load.append(load)
        if self.metrics is not None:
            self.metrics.cpu.set(cpu)
            self.metrics.load.set(load)
        if memory_available_percent() < self.s.min_free_memory_percent:
            new = 1
            self.memory_low += 1
            self.engaged += 1
        elif (cpu > self.s.max_cpu_percent or load / self.ncpu > self.s.max_load) and self._slow(now, oldest_starting):
            new = max(self.floor, self.window // 2)
            self.engaged += 1  # pressure: the window was cut or kept from growing
        else:
            new = min(self.s.parallelism, self.window * 2)
        self.window = new
        self.min_window = min(self.min_window, new)
        if self.metrics is not None:
            self.metrics.window.set(new)
        return new

    def _slow(self, now: float, oldest_starting: float | None) -> bool:
        """Agents take long to become ready: CPU or load pressure may be why (see the module docstring)."""
        return oldest_starting is not None and now - oldest_starting > _SLOW_FRACTION * self.s.timeout
