"""The parallel spawn loop: a window of agents starting at once, retries, timeouts, the report.

One call of :func:`spawn` handles one ``cfn_spawn``: it launches agents
through ``ctx.launch`` while fewer than the window are starting, sleeps in
``ctx.pump`` (which wakes on ready messages and on deaths, reported back here
through ``cfn_agent_started`` / ``cfn_agent_exited``), kills an agent that is
not ready within ``timeout`` and retries it after a backoff, and gives up on an
agent after ``max_retry`` retries: it is then named, with the reason, in the
:class:`~cfn_core.SpawnReport` and in ``ctx.spawn_failures``.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import defaultdict, deque

from cfn_core import CfnError, SpawnReport
from prometheus_client import Counter, Gauge, Histogram

from .limits import check_limits
from .throttle import Throttle

log = logging.getLogger("cfn.parallel")

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_MAX_WAIT = 0.05
_MAX_BACKOFF = 5.0
_SAMPLES = 200_000


class _SpawnMetrics:
    def __init__(self, r):
        self.seconds = Histogram("cfn_spawn_seconds", "Launch to ready of one agent (parallel spawn)", buckets=_SECONDS, registry=r)
        self.burst_seconds = Histogram("cfn_spawn_burst_seconds", "Duration of one parallel spawn call", buckets=_SECONDS, registry=r)
        self.failures = Counter("cfn_spawn_failures", "Agent starts that failed or timed out", registry=r)
        self.retries = Counter("cfn_spawn_retries", "Agent starts retried", registry=r)
        self.gave_up = Counter("cfn_spawn_gave_up", "Agents that never became ready", registry=r)
        self.concurrent = Gauge("cfn_spawn_concurrent", "Agents starting at this moment", registry=r)
        self.window = Gauge("cfn_spawn_window", "Current spawn window (parallelism after throttling)", registry=r)
        self.cpu = Gauge("cfn_spawn_cpu_percent", "Machine CPU use sampled during the spawn burst", registry=r)
        self.load = Gauge("cfn_spawn_load1", "1-minute load average sampled during the spawn burst", registry=r)


class SpawnState:
    """Per-session state and figures of cfn-parallel (``ctx.state["parallel"]``)."""

    def __init__(self, ctx):
        self.m = _SpawnMetrics(ctx.metrics.registry)
        self.active = False
        self.events: list[str] = []
        self.n = dict(calls=0, requested=0, ready=0, attempts=0, failures=0, retries=0, gave_up=0, sequential_fallbacks=0)
        self.seconds = 0.0
        self.spawn_times: list[float] = []
        self.max_concurrent = 0
        self.throttle_engaged = 0
        self.min_window: int | None = None
        self.cpu: list[float] = []
        self.load: list[float] = []

    def figures(self) -> dict:
        attempts = self.n["attempts"]
        times = sorted(self.spawn_times)

        def pct(p):
            return round(times[min(len(times) - 1, int(p / 100 * len(times)))] * 1e3, 3) if times else None

        return {
            **self.n,
            "failure_rate": round(self.n["failures"] / attempts, 5) if attempts else 0.0,
            "seconds": round(self.seconds, 4),
            "spawn_p50_ms": pct(50),
            "spawn_p99_ms": pct(99),
            "max_concurrent": self.max_concurrent,
            "throttle_engaged": self.throttle_engaged,
            "min_window": self.min_window,
            "cpu_max_percent": max(self.cpu) if self.cpu else None,
            "cpu_mean_percent": round(sum(self.cpu) / len(self.cpu), 1) if self.cpu else None,
            "load1_max": round(max(self.load), 2) if self.load else None,
        }


def spawn(ctx, st: SpawnState, agent_ids: list[str]) -> SpawnReport:
    s = ctx.config.section("parallel")
    if not agent_ids:
        return SpawnReport()
    check_limits(len(agent_ids))
    t_start = time.perf_counter()
    throttle = Throttle(s, st.m)
    throttle.begin()
    st.n["calls"] += 1
    st.n["requested"] += len(agent_ids)

    queue = deque(agent_ids)
    retry: list[tuple[float, int, str]] = []  # (due, seq, id)
    inflight: dict[str, float] = {}  # id -> launched at (launch order)
    killing: set[str] = set()
    attempts: dict[str, int] = defaultdict(int)
    ready: set[str] = set()
    failed: dict[str, str] = {}
    consecutive = 0
    sequential = False
    seq = 0
    deadline = time.monotonic() + s.init_timeout

    def failure(agent_id: str, reason: str) -> None:
        nonlocal consecutive, sequential, seq
        consecutive += 1
        st.n["failures"] += 1
        st.m.failures.inc()
        if attempts[agent_id] <= s.max_retry:
            st.n["retries"] += 1
            st.m.retries.inc()
            delay = min(_MAX_BACKOFF, s.backoff * 2 ** (attempts[agent_id] - 1)) * random.uniform(0.8, 1.2)
            seq += 1
            heapq.heappush(retry, (time.monotonic() + delay, seq, agent_id))
            log.info("cfn-parallel: %s failed to start (%s); retry %d in %.2fs", agent_id, reason, attempts[agent_id], delay)
        else:
            failed[agent_id] = f"{reason} (gave up after {attempts[agent_id]} attempt(s))"
            ctx.spawn_failures[agent_id] = failed[agent_id]
            st.n["gave_up"] += 1
            st.m.gave_up.inc()
        if s.sequential_after and consecutive >= s.sequential_after and not sequential:
            sequential = True
            st.n["sequential_fallbacks"] += 1
            log.warning("cfn-parallel: %d failed starts in a row; starting the rest one at a time", consecutive)

    st.active = True
    st.events = []
    try:
        while queue or retry or inflight:
            now = time.monotonic()
            if now >= deadline:
                _give_up_all(ctx, s, queue, retry, inflight, killing, failed)
                break
            while retry and retry[0][0] <= now:
                queue.append(heapq.heappop(retry)[2])
            oldest = next(iter(inflight.values()), None)  # launch order: the first is the oldest
            window = 1 if sequential else throttle.current(now, oldest)
            while queue and len(inflight) < window:
                agent_id = queue.popleft()
                attempts[agent_id] += 1
                st.n["attempts"] += 1
                try:
                    ctx.launch(agent_id)
                except CfnError:
                    raise  # the user's problem (limits, ids): say it, do not retry it
                except Exception as exc:  # noqa: BLE001 - fork/exec failures are retried
                    failure(agent_id, f"launch failed: {type(exc).__name__}: {exc}")
                    continue
                inflight[agent_id] = time.monotonic()
            st.m.concurrent.set(len(inflight))
            st.max_concurrent = max(st.max_concurrent, len(inflight))

            # sleep until an agent answers or dies, a timeout or a retry is due
            wake = deadline
            for agent_id, launched in inflight.items():
                if agent_id not in killing:
                    wake = min(wake, launched + s.timeout)
                    break
            if retry:
                wake = min(wake, retry[0][0])
            if inflight or retry:
                ctx.pump(min(_MAX_WAIT, max(0.0, wake - time.monotonic())))

            events, st.events = st.events, []
            for agent_id in events:
                if agent_id not in inflight:
                    continue
                h = ctx.agents[agent_id]
                if h.state == "ready":
                    del inflight[agent_id]
                    dt = max(0.0, h.ready_at - h.launched_at)  # 0 for an agent forked ahead of its launch
                    ready.add(agent_id)
                    consecutive = 0
                    st.m.seconds.observe(dt)
                    if len(st.spawn_times) < _SAMPLES:
                        st.spawn_times.append(dt)
                elif not h.alive:
                    del inflight[agent_id]
                    if agent_id in killing:
                        killing.discard(agent_id)
                        failure(agent_id, f"not ready within {s.timeout:g}s")
                    else:
                        failure(agent_id, f"exited with status {h.exit_code} before it was ready")
            now = time.monotonic()
            for agent_id, launched in inflight.items():
                if agent_id in killing:
                    continue
                if now - launched <= s.timeout:
                    break  # launch order: the rest are younger
                killing.add(agent_id)
                ctx.kill(ctx.agents[agent_id], f"not ready within {s.timeout:g}s")
    finally:
        st.active = False
        st.events = []
        st.m.concurrent.set(0)
        elapsed = time.perf_counter() - t_start
        st.seconds += elapsed
        st.m.burst_seconds.observe(elapsed)
        st.throttle_engaged += throttle.engaged
        st.min_window = throttle.min_window if st.min_window is None else min(st.min_window, throttle.min_window)
        st.cpu += throttle.cpu
        st.load += throttle.load
    st.n["ready"] += len(ready)
    return SpawnReport(ready=[a for a in agent_ids if a in ready], failed={a: failed[a] for a in agent_ids if a in failed})


def _give_up_all(ctx, s, queue, retry, inflight, killing, failed) -> None:
    """``init_timeout`` is over: kill what is still starting, report everything not ready."""
    reason = f"not ready within [parallel] init_timeout = {s.init_timeout:g}s"
    pending = list(inflight) + list(queue) + [a for _, _, a in retry]
    for agent_id in inflight:
        ctx.kill(ctx.agents[agent_id], reason)
    for agent_id in pending:
        failed[agent_id] = ctx.spawn_failures[agent_id] = reason
    handles = [ctx.agents[a] for a in inflight]
    deadline = time.monotonic() + 5.0
    while any(h.alive for h in handles) and time.monotonic() < deadline:
        ctx.pump(_MAX_WAIT)
    inflight.clear()
    queue.clear()
    retry.clear()
    killing.clear()
