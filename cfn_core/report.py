"""Results of a coordination and their rendering (text summary, JSON)."""

from __future__ import annotations

import statistics
from typing import Any

import attrs
from attrs import define, field

from .messages import TaskResult
from .metrics import PHASES

#: the error of a task a limit never let start (``CoordinatorContext.not_started``)
NOT_STARTED = "not started: "


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@define
class RoundResult:
    """One coordination round.

    Delivery is measured, not assumed: ``planned`` counts every message the
    round needs (a task and its result per task, plus every mesh peer
    message); ``delivered`` counts those that arrived (a result proves its task
    arrived; peers are counted by their receivers, de-duplicated by id).

    ``round`` is the round's place in its ``Coordinator.run`` (1, 2, ... in every
    run); ``session_round`` its place in the coordinator session (1, 2, ... over
    every ``run`` of one ``with Coordinator(...)`` block, never restarting), the
    number its messages carry and ``cfn_coordination_start`` receives.
    """

    round: int
    session_round: int = 0
    agents: int = 0
    tasks: int = 0
    phases: dict[str, float] = field(factory=lambda: {p: 0.0 for p in PHASES})
    seconds: float = 0.0
    planned: int = 0
    delivered: int = 0
    messages_sent: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    retries: int = 0
    latency_p50: float | None = None
    latency_p99: float | None = None
    results: dict[str, TaskResult] = field(factory=dict)
    spawn_failures: dict[str, str] = field(factory=dict)
    interrupted: bool = False
    #: why the round stopped before it finished (the bus filled, ...); None when it did not
    error: str | None = None

    @property
    def delivery_rate(self) -> float:
        return self.delivered / self.planned if self.planned else 1.0

    @property
    def failed(self) -> int:
        """Tasks that failed or never got a result; cancelled and skipped ones are counted apart."""
        return sum(1 for r in self.results.values() if not r.ok and not r.cancelled and not r.skipped) + (self.tasks - len(self.results))

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.results.values() if r.cancelled)

    @property
    def skipped(self) -> int:
        """Tasks that never ran because a task they needed (``after``, ``needs``) failed or was cancelled."""
        return sum(1 for r in self.results.values() if r.skipped)

    def to_dict(self, with_tasks: bool = False) -> dict[str, Any]:
        d = {
            "round": self.round,
            "session_round": self.session_round,
            "agents": self.agents,
            "tasks": self.tasks,
            "seconds": self.seconds,
            "phases": dict(self.phases),
            "messages_planned": self.planned,
            "messages_delivered": self.delivered,
            "messages_sent": self.messages_sent,
            "delivery_rate": self.delivery_rate,
            "dead_lettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "retries": self.retries,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "skipped": self.skipped,
            "latency_p50": self.latency_p50,
            "latency_p99": self.latency_p99,
            "spawn_failures": dict(self.spawn_failures),
            "interrupted": self.interrupted,
            "error": self.error,
            "errors": sorted({r.error for r in self.results.values() if r.error})[:20],
        }
        if with_tasks:
            d["results"] = {k: attrs.asdict(v) for k, v in self.results.items()}
        return d


@define
class CoordinationResult:
    """Everything one ``Coordinator.run`` measured: rounds, totals, plugin figures."""

    plugins: list[str] = field(factory=list)
    bus: str = "shm"
    topology: str = "star"
    rounds: list[RoundResult] = field(factory=list)
    seconds: float = 0.0
    plugin_figures: dict[str, Any] = field(factory=dict)
    fallbacks: list[dict] = field(factory=list)
    interrupted: bool = False
    #: why the coordination stopped before it finished (exit status 3); None when it did not
    error: str | None = None
    #: seconds the session took to open (plugins, bus, a pool's pre-spawn) and to close, when
    #: the caller measured them (`cfn run` does); ``seconds`` covers the rounds alone
    open_seconds: float = 0.0
    close_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        """Wall time of the whole coordination: session open, the rounds and session close."""
        return self.open_seconds + self.seconds + self.close_seconds

    @property
    def agents(self) -> int:
        return max((r.agents for r in self.rounds), default=0)

    @property
    def tasks(self) -> int:
        return sum(r.tasks for r in self.rounds)

    @property
    def planned(self) -> int:
        return sum(r.planned for r in self.rounds)

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.rounds)

    @property
    def delivery_rate(self) -> float:
        return self.delivered / self.planned if self.planned else 1.0

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.rounds)

    @property
    def cancelled(self) -> int:
        return sum(r.cancelled for r in self.rounds)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.rounds)

    @property
    def results(self) -> dict[str, TaskResult]:
        out: dict[str, TaskResult] = {}
        for r in self.rounds:
            out.update(r.results)
        return out

    @property
    def ok(self) -> bool:
        return not self.interrupted and self.error is None and self.failed == 0 and self.delivered == self.planned

    @property
    def not_started(self) -> int:
        """Tasks never started because a limit said so (a budget: ``ctx.not_started``)."""
        return sum(1 for x in self.results.values() if not x.ok and (x.error or "").startswith(NOT_STARTED))

    @property
    def exit_code(self) -> int:
        """0 all delivered, 1 something failed or was lost, 3 stopped on an error,
        4 every failure is a task not started (a budget ran out), 130 interrupted."""
        if self.interrupted:
            return 130
        if self.error is not None:
            return 3
        if self.ok:
            return 0
        not_started = self.not_started
        return 4 if not_started and not_started == self.failed else 1

    def phases(self) -> dict[str, float]:
        """Per-phase seconds summed over rounds."""
        out = {p: 0.0 for p in PHASES}
        for r in self.rounds:
            for k, v in r.phases.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def to_dict(self, with_tasks: bool = False) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "plugins": self.plugins,
            "bus": self.bus,
            "topology": self.topology,
            "agents": self.agents,
            "tasks": self.tasks,
            "messages_planned": self.planned,
            "messages_delivered": self.delivered,
            "messages_sent": sum(r.messages_sent for r in self.rounds),
            "delivery_rate": self.delivery_rate,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "skipped": self.skipped,
            "not_started": self.not_started,
            "dead_lettered": sum(r.dead_lettered for r in self.rounds),
            "retries": sum(r.retries for r in self.rounds),
            "seconds": self.seconds,
            "open_seconds": self.open_seconds,
            "close_seconds": self.close_seconds,
            "total_seconds": self.total_seconds,
            "phases": self.phases(),
            "rounds": [r.to_dict(with_tasks) for r in self.rounds],
            "plugin_figures": self.plugin_figures,
            "fallbacks": self.fallbacks,
            "interrupted": self.interrupted,
            "error": self.error,
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def render_summary(result: CoordinationResult) -> str:
    """The human summary ``cfn run`` prints."""
    lines = []
    status = "INTERRUPTED" if result.interrupted else "OK" if result.ok else "FAILED"
    plugins = "+".join(result.plugins) or "baseline"
    lines.append(f"cfn run: {status}  plugins={plugins}  bus={result.bus}  topology={result.topology}")
    if result.error is not None:
        lines.append(f"  stopped: {result.error}")
    lines.append(
        f"  agents {result.agents}  tasks {result.tasks}  messages {result.delivered}/{result.planned} delivered "
        f"({result.delivery_rate:.2%})  failed {result.failed}"
        + (f"  cancelled {result.cancelled}" if result.cancelled else "")
        + (f"  skipped {result.skipped} (a task they need failed)" if result.skipped else "")
        + (f" (not started: {result.not_started}, exit status 4)" if result.not_started else "")
    )
    for r in result.rounds:
        phases = "  ".join(f"{p} {_ms(r.phases.get(p, 0.0))}" for p in PHASES)
        lines.append(f"  round {r.round}: {r.seconds:.3f} s  [{phases}]")
        extra = []
        if r.latency_p50 is not None:
            extra.append(f"task latency p50 {_ms(r.latency_p50)} p99 {_ms(r.latency_p99)}")
        if r.retries:
            extra.append(f"retries {r.retries}")
        if r.dead_lettered:
            extra.append(f"dead-lettered {r.dead_lettered}")
        if r.duplicates:
            extra.append(f"duplicates dropped {r.duplicates}")
        if r.spawn_failures:
            first, why = next(iter(r.spawn_failures.items()))
            extra.append(f"agents never ready {len(r.spawn_failures)} ({first}: {why})")
        if extra:
            lines.append("           " + ", ".join(extra))
        errors = sorted({res.error for res in r.results.values() if res.error})
        for err in errors[:5]:
            lines.append(f"           error: {err}")
    if result.open_seconds or result.close_seconds:
        lines.append(
            f"  total {result.total_seconds:.3f} s  (session open {result.open_seconds:.3f} s, "
            f"rounds {result.seconds:.3f} s, session close {result.close_seconds:.3f} s)"
        )
    else:
        lines.append(f"  total {result.seconds:.3f} s")
    for name, figures in result.plugin_figures.items():
        items = [f"{k}={_fmt(v)}" for k, v in figures.items() if not isinstance(v, (dict, list))]
        lines += _wrap(f"  {name}: ", items)
    for fb in result.fallbacks:
        where = " in agents" if fb.get("side") == "agent" else ""
        lines.append(f"  fallback: {fb['plugin']} failed in {fb['hook']}{where} {fb['count']}x ({fb['error']}); baseline used")
    return "\n".join(lines)


#: the widest line of a plugin's figures in the summary (a terminal's, with room)
SUMMARY_WIDTH = 100


def _wrap(head: str, items: list[str], width: int = SUMMARY_WIDTH) -> list[str]:
    """``head`` then the items joined by ", ", continued on indented lines at ``width``."""
    lines, line = [], head
    indent = " " * len(head)
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and line not in (head, indent) and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = indent
        line += ("" if line in (head, indent) else " ") + piece
    lines.append(line)
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
