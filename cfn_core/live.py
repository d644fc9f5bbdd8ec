"""What a running coordinator publishes for watchers, and the stop request it obeys.

From its tick (:meth:`Live.tick`, called every ``TICK`` by ``CoordinatorContext.pump``)
the coordinator

* rewrites the bus state key ``snapshot`` (on the shm bus the file
  ``<run dir>/state/snapshot``, replaced atomically) at most every
  :data:`SNAPSHOT_SECONDS`: one JSON object that ``cfn top`` reads (see
  :func:`build_snapshot` for its fields);
* looks, at the same pace, for the state key ``stop`` that ``cfn stop`` writes, and ends
  the round in progress at once by raising :class:`StopRequested` (a KeyboardInterrupt,
  so every cleanup path treats it like SIGTERM: agents stopped, run directory removed);
* logs the messages it sent and received per :data:`MESSAGES_SECONDS` (``messages``
  events) and flushes the event log.

The cost is bounded by the intervals, not by the traffic: one snapshot of 500 agents is
one pass over the handles and one file of about 100 KB, four times a second.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import orjson

from .errors import CfnError
from .report import percentile
from .roles import role_of

log = logging.getLogger("cfn")

#: seconds between two snapshots (None: no snapshot, no stop request; benchmarks compare)
SNAPSHOT_SECONDS: float | None = 0.25
#: seconds covered by one ``messages`` event
MESSAGES_SECONDS = 1.0
#: state keys of the bus
SNAPSHOT_KEY = "snapshot"
STOP_KEY = "stop"
#: format version of the snapshot
VERSION = 1
#: latencies the snapshot's p50 is taken over (the most recent ones)
_LATENCY_WINDOW = 1000
#: seconds the throughput is measured over
_THROUGHPUT_WINDOW = 5.0


class StopRequested(KeyboardInterrupt):
    """``cfn stop`` asked the run to end.  A KeyboardInterrupt, like SIGTERM's, so no
    ``except Exception`` in a plugin or handler can swallow it and every cleanup runs."""


class Live:
    """The coordinator side of watching: snapshot, stop request, message counts."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.next_snapshot = 0.0
        self.next_messages = time.monotonic() + MESSAGES_SECONDS
        self.messages_mark = (0, 0)
        self.stop_seen = False
        self.snapshot_warned = False
        self.finished: list[tuple[float, int]] = []  # (monotonic time, tasks finished by then), for throughput
        #: the snapshot last built (what `cfn run`'s own view on a terminal draws), or None
        self.last: dict[str, Any] | None = None

    def tick(self, ctx, now: float) -> None:
        """One coordinator tick: flush the event log; messages, snapshot and stop when due."""
        ctx.events.tick(now)
        if now >= self.next_messages:
            self._messages(ctx, now)
        if SNAPSHOT_SECONDS is None or now < self.next_snapshot:
            return
        t0 = time.perf_counter()
        self.last = build_snapshot(ctx, self, now)
        try:
            ctx.bus.put_state(SNAPSHOT_KEY, orjson.dumps(self.last))
        except (CfnError, OSError) as exc:  # a full bus: what watches the run must not end it
            if not self.snapshot_warned:
                log.debug("could not write the snapshot for cfn top (tried again every tick): %s", exc)
                self.snapshot_warned = True
        # with 10,000 agents (hosted ones) a snapshot takes ~0.3 s: at most a tenth of the time
        self.next_snapshot = now + max(SNAPSHOT_SECONDS, 10 * (time.perf_counter() - t0))
        if ctx.current_round is not None and not self.stop_seen:
            request = ctx.bus.get_local_state(STOP_KEY)  # `cfn stop` writes the local run directory
            if request is not None:
                self.stop_seen = True
                try:
                    by = json.loads(request)
                except ValueError:
                    by = {}
                ctx.events.emit("stop_requested", by=by.get("pid") if isinstance(by, dict) else None)
                raise StopRequested()

    def _messages(self, ctx, now: float) -> None:
        sent, received = ctx.counters["sent"], ctx.counters["received"]
        interval = now - (self.next_messages - MESSAGES_SECONDS)
        ctx.events.emit(
            "messages",
            seconds=round(interval, 3),
            sent=sent - self.messages_mark[0],
            received=received - self.messages_mark[1],
        )
        self.messages_mark = (sent, received)
        self.next_messages = now + MESSAGES_SECONDS

    def throughput(self, finished: int, now: float) -> float:
        """Tasks finished per second over the last few seconds."""
        self.finished.append((now, finished))
        while len(self.finished) > 2 and now - self.finished[1][0] >= _THROUGHPUT_WINDOW:
            self.finished.pop(0)
        t0, n0 = self.finished[0]
        return (finished - n0) / (now - t0) if now > t0 else 0.0


def build_snapshot(ctx, live: Live, now: float) -> dict[str, Any]:
    """The snapshot ``cfn top`` reads (docs/USER_GUIDE.md, "Watching a run").

    ``agents``: one entry per agent alive: ``id``, ``role``, ``state``, ``pid``,
    ``host`` (the host process of a hosted agent, docs/HOSTING.md, else null), ``incarnation``, ``task`` (the oldest task sent to it and not answered, or null),
    ``elapsed`` (seconds since that task was sent or the agent relaunched for it),
    ``quiet`` (seconds since the later of that and the agent's last message: what a stall
    is judged by), ``status`` (its last status line, or null), ``messages_in`` /
    ``messages_out`` (tasks the coordinator sent it / messages it sent the coordinator).
    The rest is counts: per state, per role and state, and tasks ``queued``, ``done``,
    ``failed``, ``retried`` in the session; ``throughput`` (tasks finished per second
    over the last few seconds) and ``latency_p50`` (of the round in progress).
    """
    agents = []
    by_state: dict[str, int] = {}
    by_role: dict[str, dict[str, int]] = {}
    for handle in ctx.agents.values():
        if not handle.alive:
            continue
        role = role_of(ctx.config, handle.id).name
        state = "busy" if handle.outstanding and handle.state == "ready" else handle.state
        by_state[state] = by_state.get(state, 0) + 1
        per_role = by_role.setdefault(role, {})
        per_role[state] = per_role.get(state, 0) + 1
        task = elapsed = None
        quiet = now - handle.last_seen
        if handle.outstanding:
            task, sent = next(iter(handle.outstanding.items()))
            elapsed = round(now - sent, 3)
            quiet = now - max(sent, handle.last_seen)
        status = handle.info.get("status")
        if isinstance(status, dict):  # the talk contract: {"text": ..., "fields": {...}}
            status = status.get("text")
        agents.append(
            {
                "id": handle.id,
                "role": role,
                "state": state,
                "pid": handle.pid,
                "host": handle.info.get("host"),
                "incarnation": handle.incarnation,
                "task": task,
                "elapsed": elapsed,
                "quiet": round(quiet, 3),
                "status": status if status is None else str(status)[:200],
                "messages_in": handle.info.get("messages_in", 0),
                "messages_out": handle.info.get("messages_out", 0),
            }
        )
    counts = ctx.events.counts
    finished = counts["task_done"] + counts["task_failed"]
    r = ctx.current_round
    return {
        "v": VERSION,
        "written_at": time.time(),
        "coordinator_pid": os.getpid(),
        "run": ctx.run_ref,
        "started_at": live.started_at,
        "round": r.number if r is not None else None,
        "agents": agents,
        "by_state": by_state,
        "by_role": by_role,
        "tasks": {
            "queued": counts["task_queued"],
            "done": counts["task_done"],
            "failed": counts["task_failed"],
            "retried": counts["task_retried"],
        },
        "throughput": round(live.throughput(finished, now), 3),
        "latency_p50": percentile(r.latencies[-_LATENCY_WINDOW:], 50) if r is not None and r.latencies else None,
    }
