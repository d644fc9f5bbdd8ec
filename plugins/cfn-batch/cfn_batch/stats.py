"""Batch figures: kept as flat integer counters, gathered on the coordinator, exported to Prometheus.

Agents have no metrics registry: their figures live in ``ctx.counters`` under
``batch.*`` keys, which the kernel gathers on the coordinator
(``ctx.agent_counters("batch.")``, see :mod:`cfn_core.figures`: every
result's snapshot, then each process's final counters as it exits).  The
coordinator adds its own; :class:`BatchCollector` exposes the sum on
``ctx.metrics.registry`` as ``cfn_batch_*`` metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Mapping


#: histogram bucket upper bounds (the last bucket is +Inf)
MESSAGES_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

#: flush reasons: size, leading (a send() that starts a burst, written during the call),
#: timeout (flusher), explicit/shutdown (cfn_flush), unbatched (flusher down),
#: closed (sent after shutdown, delivered at once)
REASONS = ("size", "leading", "timeout", "explicit", "shutdown", "unbatched", "closed")

P = "batch."
_MAXED = (P + "size_now", P + "latency_max_us")


_BATCHES, _MESSAGES, _BYTES = P + "batches", P + "messages", P + "bytes"
_LATENCY_SUM, _LATENCY_MAX = P + "latency_sum_us", P + "latency_max_us"
_FLUSH_KEYS = {r: f"{P}flush.{r}" for r in REASONS}
_MESSAGES_LE = tuple(f"{P}messages_le.{i}" for i in range(len(MESSAGES_BUCKETS) + 1))
_BYTES_LE = tuple(f"{P}bytes_le.{i}" for i in range(len(BYTES_BUCKETS) + 1))
_LATENCY_LE = tuple(f"{P}latency_le.{i}" for i in range(len(LATENCY_BUCKETS) + 1))


class BatchStats:
    """Counters of one process, written into ``counters`` (an agent's ``ctx.counters``).

    A counter is created when it is first counted (a missing one is 0, as
    everywhere in :mod:`cfn_core.figures`): a forked agent that sends one result
    touches 7 keys, not all ~50 (each a string in the zygote's memory,
    whose reference count would copy its page into the agent).  The
    kernel copies the dict in one step before it reads it, so another thread
    adding a key here never disturbs it.  Called with the batcher's lock held.
    """

    def __init__(self, counters: dict, floor: int):
        self.c = counters
        counters[P + "size_now"] = floor

    def batch(self, reason: str, messages: int, nbytes: int, now: float, arrivals: list | None) -> None:
        """One delivered batch of ``messages`` records whose arrival times (ascending) are ``arrivals``.

        ``arrivals`` None: all arrived at ``now`` (written during their send).  The
        added-latency histogram counts messages, not batches: each record waited
        ``now`` minus its arrival.  Counted with one ``bisect`` per bucket bound,
        not per record, and none when the oldest waited less than the first bound.
        """
        c = self.c
        if arrivals is None:
            count_unbuffered(c, messages, nbytes, reason)
            return
        count_write(c, reason, messages, nbytes)
        c[_LATENCY_SUM] = c.get(_LATENCY_SUM, 0) + int(max(0.0, messages * now - sum(arrivals)) * 1e6)
        longest = now - arrivals[0]
        us = int(longest * 1e6)
        if us > c.get(_LATENCY_MAX, 0):
            c[_LATENCY_MAX] = us
        if longest <= LATENCY_BUCKETS[0]:
            k = _LATENCY_LE[0]
            c[k] = c.get(k, 0) + messages
            return
        below = 0  # records that waited at most the previous bound
        for i, bound in enumerate(LATENCY_BUCKETS):
            upto = messages - bisect_left(arrivals, now - bound)  # waited <= bound
            if upto > below:
                k = _LATENCY_LE[i]
                c[k] = c.get(k, 0) + upto - below
                below = upto
        if messages > below:
            k = _LATENCY_LE[-1]
            c[k] = c.get(k, 0) + messages - below

    def size_now(self, size: int) -> None:
        self.c[P + "size_now"] = size

    def _add(self, key: str, n: int = 1) -> None:
        self.c[key] = self.c.get(key, 0) + n

    def unbatched(self, n: int) -> None:
        self._add(P + "unbatched_messages", n)

    def flusher_death(self) -> None:
        self._add(P + "flusher_deaths")

    def flusher_restart(self) -> None:
        self._add(P + "flusher_restarts")

    def deliver_error(self) -> None:
        self._add(P + "deliver_errors")


def count_write(c: dict, reason: str, messages: int, nbytes: int) -> None:
    """Count one write of ``messages`` records (``nbytes``) in ``c``: batches, messages, bytes, reason, sizes.

    :meth:`BatchStats.batch` adds the added-latency figures; a message written during
    its send without a batcher (``cfn_batch.cfn_send``) waited for nothing, which
    :func:`count_unbuffered` adds.
    """
    c[_BATCHES] = c.get(_BATCHES, 0) + 1
    c[_MESSAGES] = c.get(_MESSAGES, 0) + messages
    c[_BYTES] = c.get(_BYTES, 0) + nbytes
    k = _FLUSH_KEYS.get(reason, _FLUSH_KEYS["explicit"])  # a plugin's own reason: a flush asked for
    c[k] = c.get(k, 0) + 1
    k = _MESSAGES_LE[bisect_left(MESSAGES_BUCKETS, messages)]
    c[k] = c.get(k, 0) + 1
    k = _BYTES_LE[bisect_left(BYTES_BUCKETS, nbytes)]
    c[k] = c.get(k, 0) + 1


def count_unbuffered(c: dict, messages: int, nbytes: int, reason: str = "leading") -> None:
    """A write of records that waited for nothing (written during their send): its figures and no added latency."""
    count_write(c, reason, messages, nbytes)
    c[_LATENCY_LE[0]] = c.get(_LATENCY_LE[0], 0) + messages


def only_batch(counters: Mapping) -> dict:
    return {k: v for k, v in counters.items() if k.startswith(P) and isinstance(v, int)}


def merge(snapshots: Iterable[Mapping]) -> dict:
    """Sum counters over processes (maximum for the gauges)."""
    out: dict[str, int] = {}
    for snap in snapshots:
        for k, v in snap.items():
            if k in _MAXED:
                out[k] = max(out.get(k, 0), v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def quantile_bound(counters: Mapping, name: str, bounds: tuple, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (None without data, inf past the last bound)."""
    counts = [counters.get(f"{P}{name}_le.{i}", 0) for i in range(len(bounds) + 1)]
    total = sum(counts)
    if not total:
        return None
    need = q * total
    running = 0
    for i, n in enumerate(counts):
        running += n
        if running >= need:
            return bounds[i] if i < len(bounds) else float("inf")
    return float("inf")


def figures(counters: Mapping) -> dict:
    """The summary figures ``cfn_report`` returns for ``counters`` (one process or a merge)."""
    batches = counters.get(P + "batches", 0)
    messages = counters.get(P + "messages", 0)
    p99 = quantile_bound(counters, "latency", LATENCY_BUCKETS, 0.99)
    return {
        "batches": batches,
        "messages": messages,
        "messages_per_batch": round(messages / batches, 2) if batches else None,
        "bytes_per_batch": round(counters.get(P + "bytes", 0) / batches, 1) if batches else None,
        "flushes": {r: counters.get(f"{P}flush.{r}", 0) for r in REASONS},
        "added_latency_mean_ms": round(counters.get(P + "latency_sum_us", 0) / messages / 1000, 3) if messages else None,
        "added_latency_p99_ms_at_most": None if p99 is None else (p99 * 1000 if p99 != float("inf") else "inf"),
        "added_latency_max_ms": counters.get(P + "latency_max_us", 0) / 1000,
        "batch_size_now": counters.get(P + "size_now", 0),
        "flusher_deaths": counters.get(P + "flusher_deaths", 0),
        "flusher_restarts": counters.get(P + "flusher_restarts", 0),
        "unbatched_messages": counters.get(P + "unbatched_messages", 0),
        "deliver_errors": counters.get(P + "deliver_errors", 0),
    }


class BatchCollector:
    """Prometheus collector: the coordinator's and the agents' figures as ``cfn_batch_*`` metrics."""

    def __init__(self, totals):
        self.totals = totals  # callable -> merged counters

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        c = self.totals()

        def histogram(name, doc, key, bounds, total_sum):
            buckets, running = [], 0
            for i, le in enumerate(bounds):
                running += c.get(f"{P}{key}_le.{i}", 0)
                buckets.append((repr(float(le)), running))
            running += c.get(f"{P}{key}_le.{len(bounds)}", 0)
            buckets.append(("+Inf", running))
            return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total_sum)

        yield histogram(
            "cfn_batch_messages_per_batch", "Messages per delivered batch", "messages", MESSAGES_BUCKETS, c.get(P + "messages", 0)
        )
        yield histogram("cfn_batch_bytes_per_batch", "Bytes per delivered batch", "bytes", BYTES_BUCKETS, c.get(P + "bytes", 0))
        yield histogram(
            "cfn_batch_added_latency_seconds",
            "Time each message waited in its sender's buffer before it was written",
            "latency",
            LATENCY_BUCKETS,
            c.get(P + "latency_sum_us", 0) / 1e6,
        )
        flushes = CounterMetricFamily("cfn_batch_flushes", "Batches delivered, by flush reason", labels=["reason"])
        for r in REASONS:
            flushes.add_metric([r], c.get(f"{P}flush.{r}", 0))
        yield flushes
        for key, doc in (
            ("messages", "Messages delivered in batches"),
            ("flusher_deaths", "Flusher threads that died"),
            ("flusher_restarts", "Flusher threads restarted"),
            ("unbatched_messages", "Messages sent unbatched while a flusher was down"),
            ("deliver_errors", "Timed flushes that failed and were retried"),
        ):
            yield CounterMetricFamily(f"cfn_batch_{key}", doc, value=c.get(P + key, 0))
        yield GaugeMetricFamily("cfn_batch_size", "Current (adaptive) batch size, largest over processes", value=c.get(P + "size_now", 0))
