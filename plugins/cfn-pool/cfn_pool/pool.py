"""The pool's bookkeeping on the coordinator: which agents it owns, which are idle, what it did.

An agent id belongs to the pool from the moment the pool launches it until
its process ends.  With roles (``[agents.<role>]``) every count is kept per role:
``size`` and ``min_size`` are shared out over the roles by their counts, a round
takes each role's count of its idle agents, and a task goes to an idle agent of
its role (the kernel passes those alone to ``cfn_assign``).  Pooled agents of a
role are named ``<role>-0001`` ..., so each one runs its role's handler; without
roles they are ``pool-00001`` ....  Idle agents are kept in the order they became idle; the
most recently used are handed out first, so when demand shrinks the same few
agents keep working and the others age past ``max_idle`` and are retired.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque

from cfn_core import CfnError, plugin_implementations, role_of, roles_of, share_out
from prometheus_client import Counter, Gauge, Histogram

from .zygote import Zygote, ZygoteError

log = logging.getLogger("cfn.pool")

_FAST = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0)
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FILL_CHUNK = 256  # the initial fill checks warmup_timeout between chunks of this many agents
_REFILL_PER_TICK = 32
_LATENCY_SAMPLES = 100_000


class _PoolMetrics:
    def __init__(self, registry):
        self.agents = Gauge("cfn_pool_agents", "Pooled agents by state", ["state"], registry=registry)
        self.acquired = Counter(
            "cfn_pool_acquired", "Agents handed to rounds, from the pool (hit) or newly spawned (miss)", ["source"],
            registry=registry,
        )
        self.hit_rate = Gauge("cfn_pool_hit_rate", "Hits / (hits + misses) since the session opened", registry=registry)
        self.assign_seconds = Histogram(
            "cfn_pool_assign_seconds", "Time to choose an idle agent for one task", buckets=_FAST, registry=registry
        )
        self.acquire_seconds = Histogram(
            "cfn_pool_acquire_seconds", "Time to provide a round's agents", buckets=_SECONDS, registry=registry
        )
        self.refills = Counter("cfn_pool_refills", "Agents started to bring the pool back to min_size", registry=registry)
        self.retired = Counter("cfn_pool_retired", "Idle agents stopped after max_idle", registry=registry)
        self.unhealthy = Counter(
            "cfn_pool_unhealthy", "Idle agents killed because they did not answer a ping", registry=registry
        )
        self.deaths = Counter("cfn_pool_deaths", "Pooled agents that died", ["while_"], registry=registry)


class Pool:
    """The pool of one coordinator session (``ctx.state["pool"]``)."""

    def __init__(self, ctx, settings):
        self.s = settings
        self.zygote: Zygote | None = None
        self.zygote_error: str | None = None
        self.zygote_pid: int | None = None
        self.zygote_start_seconds = 0.0
        self.members: set[str] = set()  # live agents the pool owns
        self.idle: dict[str, float] = {}  # id -> idle since, oldest first
        self.in_round: set[str] = set()
        self.warming: set[str] = set()  # launched by a refill, not ready yet
        self.retiring: set[str] = set()
        self.pinged: dict[str, float] = {}  # id -> when the health ping was sent
        self.lost: set[str] = set()  # died with work: the kernel relaunches them under the same id
        self.draining = False
        self.upcoming: deque[str] = deque()  # ids our cfn_spawn call is about to launch, in order
        self.pipeline = True  # fork ahead (see start)
        self.spawning = False  # inside our own cfn_spawn call: no refill from ticks
        self._next: dict[str, int] = {}  # role -> the last number of its ids
        self.n = dict(hits=0, misses=0, refills=0, retired=0, unhealthy=0, relaunched=0, died_idle=0, died_busy=0)
        self.init_seconds = 0.0
        self.init_ready = 0
        self.assign_latencies: list[float] = []
        self.m = _PoolMetrics(ctx.metrics.registry)

    # ------------------------------------------------------------------ session

    def start(self, ctx) -> None:
        t0 = time.perf_counter()
        # forking ahead is only safe when every launch of this session is ours: another
        # cfn_launch_agent (a remote placement, a test's) may start some ids elsewhere
        self.pipeline = not plugin_implementations(ctx.pm, "cfn_launch_agent", exclude=sys.modules[__package__])
        deadline = time.monotonic() + self.s.warmup_timeout
        if self.s.zygote:
            self._start_zygote(ctx)
        target = self.s.size
        for role, role_target in self._shares(ctx, target).items():
            have = 0
            while have < role_target and time.monotonic() < deadline:
                chunk = min(_FILL_CHUNK, role_target - have)
                ready = self._spawn(ctx, chunk, role)
                have += len(ready)
                self.idle.update((a, time.monotonic()) for a in ready)
                if len(ready) < chunk:
                    break  # failures are in the spawn report; the rest is spawned on demand
        self.init_ready = len(self.members)
        self.init_seconds = time.perf_counter() - t0
        if len(self.members) < target:
            log.warning("cfn-pool: %d of %d agents ready after warm-up", len(self.members), target)
        self._gauges()

    def _start_zygote(self, ctx) -> None:
        try:
            forkers = self.s.forkers or min(4, os.cpu_count() or 1)
            # a slow zygote start is still better than fresh interpreters: not bound by warmup_timeout
            self.zygote = Zygote(ctx.run_ref, start_timeout=max(30.0, self.s.warmup_timeout), forkers=forkers)
        except (ZygoteError, OSError) as exc:
            self.zygote_error = str(exc)
            log.warning("cfn-pool: no zygote (%s); agents start as fresh interpreters", exc)
            return
        self.zygote_pid = self.zygote.pid
        self.zygote_start_seconds = self.zygote.start_seconds

    def drain(self, ctx) -> None:
        """Stop every agent (they are all the zygote's children) and the zygote."""
        self.draining = True
        live = [h.id for h in ctx.agents.values() if h.alive]
        if live:
            ctx.stop_agents(live)
        self.idle.clear()
        self.members.clear()
        if self.zygote is not None:
            self.zygote.close(ctx.config.run.shutdown_timeout)
            self.zygote = None
        self._gauges()

    # ------------------------------------------------------------------ launching

    @staticmethod
    def _shares(ctx, n: int) -> dict[str, int]:
        """``n`` agents shared out over the run's roles by their counts (all of it: one role)."""
        return share_out(n, {name: role.count for name, role in roles_of(ctx.config).items()})

    def _role(self, ctx, agent_id: str) -> str:
        return role_of(ctx.config, agent_id).name

    def _spawn(self, ctx, n: int, role: str) -> list[str]:
        """Start ``n`` new agents of ``role`` through ``cfn_spawn``; returns the ready ones (now members)."""
        ids = [self._fresh_id(ctx, role) for _ in range(n)]
        self.spawning = True
        self.upcoming = deque(ids)
        try:
            report = ctx.hook.cfn_spawn(ctx=ctx, agent_ids=ids)
        finally:
            self.spawning = False
            self.upcoming = deque()
            if self.zygote is not None and self.zygote.alive:
                self.zygote.cancel_unclaimed()
        ready = [a for a in report.ready if ctx.agents[a].alive]
        self.members.update(ready)
        return ready

    def _fresh_id(self, ctx, role: str) -> str:
        """A new id of ``role``: ``<role>-0001`` ... (its agents run its handler), ``pool-00001`` ... without roles."""
        declared = roles_of(ctx.config)[role]
        while True:
            self._next[role] = number = self._next.get(role, 0) + 1
            agent_id = declared.agent_id(number) if ctx.config.roles else f"pool-{number:05d}"
            if agent_id not in ctx.agents:
                return agent_id

    def launch(self, ctx, agent_id: str):
        """``cfn_launch_agent``: fork from the zygote (restarted once if it died)."""
        if self.draining or not self.s.zygote:
            return None
        if self.zygote is not None and not self.zygote.alive:
            log.warning("cfn-pool: the zygote (pid %d) died; starting a new one", self.zygote.pid)
            self.zygote.close(0.1)
            self.zygote = None
            self._start_zygote(ctx)
        if self.zygote is None:
            return None  # the baseline launcher (a fresh interpreter)
        if self.upcoming and self.pipeline:
            # pipelining: keep the zygote forking the next agents of this spawn while we register this one,
            # topped up in chunks: every request wakes a forker and every answer wakes us, so one request
            # per half of fork_ahead (not one per launch) lets each side handle a batch per wake-up
            want = [] if self.zygote.requested(agent_id) else [agent_id]
            if self.zygote.outstanding + len(want) <= self.s.fork_ahead // 2:
                while self.upcoming and self.zygote.outstanding + len(want) < self.s.fork_ahead:
                    nxt = self.upcoming.popleft()
                    if nxt != agent_id and nxt not in ctx.agents:  # not already started by another launcher
                        want.append(nxt)
            self.zygote.request(want)
        pid = self.zygote.take(agent_id, timeout=max(self.s.warmup_timeout, 1.0))
        handle = ctx.new_handle(agent_id, pid)
        handle.info["pool.zygote"] = self.zygote.pid
        if agent_id in self.lost:  # the kernel replaces a pooled agent that died with work
            self.lost.discard(agent_id)
            self.members.add(agent_id)
            self.n["relaunched"] += 1
        return handle

    # ------------------------------------------------------------------ rounds

    def acquire(self, ctx, count: int) -> list[str]:
        t0 = time.perf_counter()
        ctx.pump(0)  # notice deaths of idle agents since the last round
        self._health_check(ctx)
        take = []
        hits = 0
        for role, want in self._shares(ctx, count).items():
            mine = []
            for agent_id in reversed(list(self.idle)):  # most recently used first
                if len(mine) >= want:
                    break
                if self._role(ctx, agent_id) == role:
                    del self.idle[agent_id]
                    if ctx.agents[agent_id].state == "ready":
                        mine.append(agent_id)
            hits += len(mine)
            if len(mine) < want:
                mine += self._spawn(ctx, want - len(mine), role)
            take += mine
        misses = count - hits
        self.n["hits"] += hits
        self.n["misses"] += misses
        self.m.acquired.labels(source="hit").inc(hits)
        self.m.acquired.labels(source="miss").inc(misses)
        total = self.n["hits"] + self.n["misses"]
        self.m.hit_rate.set(self.n["hits"] / total if total else 0.0)
        self.in_round = set(take)
        self.m.acquire_seconds.observe(time.perf_counter() - t0)
        self._gauges()
        return take

    def assign(self, ctx, task, agent_ids):
        """An agent of ``agent_ids`` (the round's agents of the task's role) with room for a task, or False."""
        t0 = time.perf_counter()
        queues = ctx.round_state.setdefault("pool.free", {})  # per role: the kernel passes one role's agents
        free = queues.get(task.role)
        if free is None:
            free = queues[task.role] = deque(agent_ids)
        agents = ctx.agents
        # fewer than [workload] prefetch tasks outstanding (1: nothing outstanding)
        room = ctx.has_room
        for scan in (False, True):
            if scan:  # the queue of known-free agents is empty: look for agents that finished
                free.extend(a for a in agent_ids if (h := agents.get(a)) is not None and h.alive and room(h))
            while free:
                agent_id = free.popleft()
                h = agents.get(agent_id)
                if h is not None and h.alive and room(h):
                    dt = time.perf_counter() - t0
                    self.m.assign_seconds.observe(dt)
                    if len(self.assign_latencies) < _LATENCY_SAMPLES:
                        self.assign_latencies.append(dt)
                    return agent_id
        return False  # every agent is busy: the kernel waits for a result and asks again

    def release(self, ctx, agent_ids) -> bool:
        now = time.monotonic()
        for agent_id in agent_ids:
            h = ctx.agents.get(agent_id)
            if h is None or not h.alive:
                continue
            self.members.add(agent_id)  # also a replacement the launcher fallback started
            if h.state == "ready":
                self.idle.pop(agent_id, None)
                self.idle[agent_id] = now
            elif h.state == "starting":
                self.warming.add(agent_id)
        self.in_round.clear()
        self._gauges()
        return True

    # ------------------------------------------------------------------ health, refill, retirement

    def _health_check(self, ctx) -> None:
        """Ping idle agents not heard from within ``health_interval``; replace those that do not answer."""
        now = time.monotonic()
        stale = [a for a in self.idle if now - ctx.agents[a].last_seen > self.s.health_interval]
        if not stale:
            return
        pings = []
        for agent_id in stale:
            self.pinged[agent_id] = now
            pings.append(ctx.factory.make(agent_id, "ping", body={"at": now}))
        ctx.send(pings)
        deadline = now + self.s.health_timeout
        waiting = set(stale)
        while waiting and time.monotonic() < deadline:
            ctx.pump(min(0.05, deadline - time.monotonic()))
            waiting = {a for a in waiting if a in self.idle and ctx.agents[a].info.get("pong_at", 0) < now}
        for agent_id in waiting:
            self._unhealthy(ctx, agent_id)

    def _unhealthy(self, ctx, agent_id: str) -> None:
        self.idle.pop(agent_id, None)
        self.pinged.pop(agent_id, None)
        self.n["unhealthy"] += 1
        self.m.unhealthy.inc()
        ctx.kill(ctx.agents[agent_id], f"no answer to the pool's health ping within {self.s.health_timeout:g}s")

    def tick(self, ctx, now: float) -> None:
        if self.draining:
            return
        # health: ping idle agents we have not heard from, replace those that stay silent
        pings = []
        for agent_id in list(self.idle):
            h = ctx.agents[agent_id]
            sent = self.pinged.get(agent_id)
            if sent is not None:
                if h.info.get("pong_at", 0) >= sent:
                    del self.pinged[agent_id]
                elif now - sent > self.s.health_timeout:
                    self._unhealthy(ctx, agent_id)
            elif now - h.last_seen > self.s.health_interval:
                self.pinged[agent_id] = now
                pings.append(ctx.factory.make(agent_id, "ping", body={"at": now}))
        if pings:
            ctx.send(pings)
        # retirement: idle too long, down to min_size (each role down to its share of it)
        floors = self._shares(ctx, self.s.floor)
        live = {role: 0 for role in floors}
        for agent_id in self.members:
            if agent_id not in self.retiring:
                live[self._role(ctx, agent_id)] += 1
        for agent_id, since in list(self.idle.items()):
            if now - since <= self.s.max_idle:
                break  # oldest first
            role = self._role(ctx, agent_id)
            if live[role] <= floors[role]:
                continue
            live[role] -= 1
            del self.idle[agent_id]
            self.retiring.add(agent_id)
            h = ctx.agents[agent_id]
            h.state = "stopping"
            ctx.send([ctx.factory.make(agent_id, "stop")])
            self.n["retired"] += 1
            self.m.retired.inc()
        # refill: below min_size, start agents in the background (ready ones join the idle pool)
        if not self.spawning:
            budget = _REFILL_PER_TICK
            for role, floor in floors.items():
                for _ in range(min(floor - live[role], budget)):
                    agent_id = self._fresh_id(ctx, role)
                    try:
                        ctx.launch(agent_id)
                    except (CfnError, OSError, ZygoteError) as exc:
                        log.warning("cfn-pool: refill failed: %s", exc)
                        budget = 0
                        break
                    budget -= 1
                    self.members.add(agent_id)
                    self.warming.add(agent_id)
                    self.n["refills"] += 1
                    self.m.refills.inc()
        self._gauges()

    def started(self, ctx, agent) -> None:
        if agent.id in self.warming:
            self.warming.discard(agent.id)
            if agent.id not in self.in_round:
                self.idle[agent.id] = time.monotonic()

    def exited(self, ctx, agent, reason: str) -> None:
        agent_id = agent.id
        if self.zygote is not None and agent.exit_code is None and reason != "stopped" and "pool.zygote" in agent.info:
            agent.exit_code = self.zygote.exit_status(agent.pid)
        if agent_id not in self.members:
            return
        self.members.discard(agent_id)
        was_idle = self.idle.pop(agent_id, None) is not None
        self.warming.discard(agent_id)
        self.retiring.discard(agent_id)
        self.pinged.pop(agent_id, None)
        if self.draining:
            return
        if reason == "stopped":
            if "recycling" in agent.info:
                # recycled ([workload] max_tasks / max_rss_mb): the kernel starts its successor
                # under this id, which stays a member (else a refill added a second agent for it)
                self.lost.add(agent_id)
            return
        if agent.outstanding:
            self.lost.add(agent_id)  # the kernel relaunches it under the same id
            self.n["died_busy"] += 1
            self.m.deaths.labels(while_="busy").inc()
        else:
            self.n["died_idle" if was_idle else "died_busy"] += 1
            self.m.deaths.labels(while_="idle" if was_idle else "busy").inc()

    # ------------------------------------------------------------------ figures

    def _gauges(self) -> None:
        self.m.agents.labels(state="idle").set(len(self.idle))
        self.m.agents.labels(state="assigned").set(len(self.in_round))
        self.m.agents.labels(state="warming").set(len(self.warming))

    def figures(self) -> dict:
        total = self.n["hits"] + self.n["misses"]
        lat = sorted(self.assign_latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3, 4) if lat else None

        return {
            "size": self.s.size,
            "min_size": self.s.floor,
            "members": len(self.members),
            "idle": len(self.idle),
            "hit_rate": round(self.n["hits"] / total, 4) if total else None,
            **self.n,
            "init_seconds": round(self.init_seconds, 4),
            "init_ready": self.init_ready,
            "zygote": self.zygote_pid is not None,
            "zygote_start_seconds": round(self.zygote_start_seconds, 4),
            "zygote_error": self.zygote_error,
            "assign_p50_ms": pct(50),
            "assign_p99_ms": pct(99),
        }
