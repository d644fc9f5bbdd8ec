"""The limits of one coordinator session: in-flight counts, a token bucket, AIMD, budgets."""

from __future__ import annotations

import time

from attrs import define
from cfn_core import ConfigError, role_of, setting
from prometheus_client import Counter, Gauge


@define(frozen=True)
class LimitsSettings:
    """``[limits]``: how many tasks run at once, how fast they start, what the run may spend."""

    max_concurrent: int = setting(
        0, "tasks in flight at once across the run (the other agents stay idle); 0: no limit", min=0, max=10_000_000
    )
    role_max_concurrent: tuple = setting(
        (), "tasks in flight at once per role, as 'role=N' items (e.g. ['coder=5', 'reviewer=2'])"
    )
    rate: float = setting(0.0, "tasks started per rate_per (a token bucket); 0: no limit", min=0.0, max=1e9)
    rate_per: str = setting("second", "the unit of rate", choices=("second", "minute"))
    burst: int = setting(0, "tasks that may start at once when the bucket is full; 0: max(1, tasks per second)", min=0, max=10_000_000)
    aimd: bool = setting(True, "a rate-limited result halves the effective rate and max_concurrent; done tasks win it back")
    aimd_floor: float = setting(0.05, "the smallest fraction of rate and max_concurrent AIMD goes down to", min=0.001, max=1.0)
    aimd_step: float = setting(0.05, "fraction of the configured limits a task done gives back", min=0.0001, max=1.0)
    aimd_cooldown: float = setting(1.0, "seconds between two decreases (rate-limited answers of tasks in flight together count once)", min=0.0, max=3600.0)
    budget_usd: float = setting(0.0, "dollars the run may spend; then no new task starts (exit status 4); 0: no budget", min=0.0, max=1e12)
    budget_tokens: int = setting(0, "tokens (in + out) the run may spend; then no new task starts (exit status 4); 0: no budget", min=0, max=10**15)


def parse_role_limits(items) -> dict[str, int]:
    """``{"coder": 5}`` from ``["coder=5"]``; a bad item is a ConfigError naming it."""
    out = {}
    for item in items:
        role, sep, number = item.partition("=")
        role = role.strip()
        try:
            n = int(number)
        except ValueError:
            n = 0
        if not sep or not role or n < 1:
            raise ConfigError(
                f"[limits] role_max_concurrent item {item!r}: must be 'role=N' with N an integer >= 1 (e.g. 'coder=5')"
            )
        out[role] = n
    return out


class _Metrics:
    def __init__(self, registry):
        self.in_flight = Gauge("cfn_limits_in_flight", "Tasks in flight (sent, not answered)", registry=registry)
        self.held = Counter("cfn_limits_held", "Times a task was held back, by the limit that held it", ["limit"], registry=registry)
        self.factor = Gauge("cfn_limits_rate_factor", "AIMD factor applied to rate and max_concurrent (1: as configured)", registry=registry)
        self.decreases = Counter("cfn_limits_aimd_decreases", "AIMD decreases after rate-limited results", registry=registry)


class Limits:
    """The session's limit state (``ctx.state["limits"]``)."""

    def __init__(self, ctx, s: LimitsSettings):
        self.s = s
        self.per_role = parse_role_limits(s.role_max_concurrent)
        self.per_second = s.rate / 60.0 if s.rate_per == "minute" else s.rate
        self.burst = s.burst or max(1, int(self.per_second))
        self.tokens = float(self.burst)
        self.refilled = time.monotonic()
        self.seen_starts = ctx.events.counts["task_assigned"]
        self.factor = 1.0
        self.last_decrease = float("-inf")
        self.n = dict(held_concurrency=0, held_rate=0, not_started_budget=0, rate_limited=0, aimd_decreases=0, starts=0)
        self.max_in_flight = 0
        self.min_factor = 1.0
        self.m = _Metrics(ctx.metrics.registry)
        self.m.factor.set(1.0)

    # ------------------------------------------------------------------ the gate

    def gate(self, ctx, task):
        """``False`` (not now) or ``None`` (go ahead: the next implementation chooses the agent)."""
        s = self.s
        if (s.budget_usd and ctx.usage.cost_usd >= s.budget_usd) or (s.budget_tokens and ctx.usage.tokens >= s.budget_tokens):
            self.n["not_started_budget"] += 1
            spent = f"${ctx.usage.cost_usd:.4f} of budget_usd = {s.budget_usd:g}" if s.budget_usd else f"{ctx.usage.tokens} tokens of budget_tokens = {s.budget_tokens}"
            ctx.not_started(task, f"budget ({spent} spent)")
            return False
        self._count_starts(ctx)
        if s.max_concurrent or self.per_role:
            total, by_role = self._in_flight(ctx)
            self.max_in_flight = max(self.max_in_flight, total)
            self.m.in_flight.set(total)
            if s.max_concurrent and total >= self._scaled(s.max_concurrent):
                return self._held("concurrency")
            limit = self.per_role.get(task.role)
            if limit and by_role.get(task.role, 0) >= self._scaled(limit):
                return self._held("concurrency")
        if self.per_second:
            now = time.monotonic()
            rate = self.per_second * self.factor
            self.tokens = min(float(self.burst), self.tokens + (now - self.refilled) * rate)
            self.refilled = now
            if self.tokens < 1.0:
                return self._held("rate")
        return None

    def _count_starts(self, ctx) -> None:
        """Take a token for every task sent since the last call (the kernel's task_assigned count)."""
        starts = ctx.events.counts["task_assigned"]
        new = starts - self.seen_starts
        if new > 0:
            self.seen_starts = starts
            self.n["starts"] += new
            if self.per_second:
                self.tokens -= new

    def _scaled(self, limit: int) -> int:
        return max(1, int(limit * self.factor)) if self.s.aimd else limit

    def _held(self, why: str) -> bool:
        self.n[f"held_{why}"] += 1
        self.m.held.labels(limit=why).inc()
        return False

    def _in_flight(self, ctx) -> tuple[int, dict[str, int]]:
        total = 0
        by_role: dict[str, int] = {}
        config = ctx.config
        for handle in ctx.agents.values():
            n = len(handle.outstanding)
            if n:
                total += n
                if self.per_role:
                    role = role_of(config, handle.id).name
                    by_role[role] = by_role.get(role, 0) + n
        return total, by_role

    # ------------------------------------------------------------------ AIMD

    def on_result(self, outcome: str, body: dict) -> None:
        if outcome == "requeued" and body.get("failure") == "rate_limited":
            self.n["rate_limited"] += 1
            now = time.monotonic()
            if self.s.aimd and now - self.last_decrease >= self.s.aimd_cooldown:
                self.last_decrease = now
                self.factor = max(self.s.aimd_floor, self.factor / 2)
                self.min_factor = min(self.min_factor, self.factor)
                self.n["aimd_decreases"] += 1
                self.m.decreases.inc()
                self.m.factor.set(self.factor)
        elif outcome == "done" and self.factor < 1.0:
            self.factor = min(1.0, self.factor + self.s.aimd_step)
            self.m.factor.set(self.factor)

    def figures(self) -> dict:
        return dict(self.n, max_in_flight=self.max_in_flight, min_rate_factor=round(self.min_factor, 4), rate_factor=round(self.factor, 4))
