"""One coordination: bus, spawn, ready barrier, distribute, collect, shutdown.

Read :meth:`Coordinator.run_round` top to bottom for the data flow.  Every
replaceable step is a hook call (see :mod:`cfn_core.hookspecs`); everything
else here is bookkeeping that keeps the guarantees:

* every agent is watched through a pidfd, so a death is noticed at once;
* an agent that dies (or is killed for exceeding ``[workload] timeout``) with
  work outstanding is relaunched under the same id, and the new incarnation
  re-reads the messages its predecessor had not settled;
* the task that was running when an agent died is charged an attempt; after
  ``max_attempts`` it is reported failed and the agent is told to skip it;
* results are de-duplicated by task id and accepted only from the agent the task
  was sent to, in the round it was sent in (rounds are numbered across the whole
  session, so nothing of an earlier ``run`` is taken for a later one's); a result
  that does not fit is dead-lettered; peer messages are de-duplicated by message
  id, and the delivery rate is counted from what arrived.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import selectors
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import orjson
import attrs
from attrs import define, field

from .config import Config, load_config
from .errors import CfnError, ConfigError, PluginError
from .events import EventLog, open_event_log
from .figures import AgentFigures
from .live import Live
from .messages import COORDINATOR_ID, Message, MessageFactory, Task, TaskResult, check_agent_id, split_message_id
from .metrics import PHASES, Metrics
from .plugins import make_plugin_manager
from .process import Janitor, ensure_fds_for_agents, interrupts_deferred, pidfd_open
from .report import NOT_STARTED, CoordinationResult, RoundResult, percentile
from .usage import Usage, check_usage
from .roles import by_role, check_role, counts, default_role, directory_document, process_agents, role_of, roles_of, share_out

log = logging.getLogger("cfn")

_TICK = 0.05
#: free space on the bus below which an agent's death at start is blamed on a full bus
_LOW_SPACE_BYTES = 64 * 1024


def _some(ids: list[str], limit: int = 6) -> str:
    """``a, b, c`` or, for many, ``a, b, c, ..., y, z``: enough for a person to see what is known."""
    if len(ids) <= limit:
        return ", ".join(ids) or "none"
    return ", ".join(ids[: limit // 2]) + ", ..., " + ", ".join(ids[-(limit // 2) :])


@define(eq=False)
class AgentHandle:
    """One agent process as the coordinator sees it.

    ``state`` is ``starting`` (launched), ``ready`` (answered), ``stopping``
    (asked to exit) or ``exited``.  ``outstanding`` maps task ids sent to it
    and not yet answered to the monotonic time they were sent, oldest first.

    A *remote* agent (started on another machine by a transport plugin such as
    cfn-redis) has ``remote`` set, an object with ``kill(handle, reason)``, and
    no pidfd (``pid`` may be None until known); its plugin reports its end with
    :meth:`CoordinatorContext.reap`.
    """

    id: str
    pid: int | None
    pidfd: int | None = None
    popen: Any = None
    launched_at: float = field(factory=time.monotonic)
    ready_at: float | None = None
    state: str = "starting"
    exit_code: int | None = None
    incarnation: int = 1
    killed_reason: str | None = None
    outstanding: dict[str, float] = field(factory=dict)
    last_seen: float = field(factory=time.monotonic)
    info: dict[str, Any] = field(factory=dict)
    remote: Any = None

    @property
    def alive(self) -> bool:
        return self.state != "exited"


@define
class SpawnReport:
    """What ``cfn_spawn`` returns: ready agent ids, and why each other one is not."""

    ready: list[str] = field(factory=list)
    failed: dict[str, str] = field(factory=dict)


class _Round:
    """Bookkeeping of the round in progress.

    ``number`` is the round's number in the session (what its messages carry);
    ``result.round`` its place in the ``run`` call that started it.
    """

    def __init__(self, number: int, run_number: int, tasks: list[Task]):
        self.number = number
        self.tasks = {t.id: t for t in tasks}
        self.order = [t.id for t in tasks]
        self.assigned: dict[str, str] = {}  # task id -> the agent it was sent to
        self.results: dict[str, TaskResult] = {}
        self.attempts: dict[str, int] = defaultdict(int)
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.result = RoundResult(round=run_number, session_round=number, tasks=len(tasks))
        self.collect = 0.0
        self.distributing = False  # tasks may still wait for an agent of the round
        self.peers_sent = 0
        self.peers_received = 0
        self.agent_ids: list[str] = []  # the round's ready agents
        # the failure policy's state (Coordinator._retry_failed): tasks waiting out a backoff,
        # what each earlier attempt ended with, re-queues for rate limits (not attempts)
        self.requeue: list[tuple[float, str]] = []  # heap of (due, task id)
        self.history: dict[str, list[str]] = defaultdict(list)
        self.rate_limited: Counter[str] = Counter()

    @property
    def done(self) -> bool:
        return len(self.results) >= len(self.tasks)

    def settle(self, task_id: str, result: TaskResult) -> None:
        """Record a task's final result (once: a later one for the same task is not taken)."""
        self.results[task_id] = result
        if self.on_settle is not None:
            self.on_settle(task_id, result)

    #: called with ``(task id, TaskResult)`` for every result recorded (the feed resolves futures)
    on_settle: Callable[[str, TaskResult], None] | None = None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def result_problem(msg: Message) -> str | None:
    """Why a result record cannot be accepted, or None when its shape is what agents send.

    Agents send ``{"ok": bool, "value": any, "error": str | None, "seconds": number >= 0,
    "peers_received": int >= 0, "peers_sent": int >= 0, "counters": {...},
    "stderr": str, "fallbacks": [...]}`` (all but ``ok`` optional) under an id
    ``<src>.<pid>.<seq>``.  Checked before any of it is used, so a forged or broken
    record is dead-lettered instead of crashing the coordinator.
    """
    parts = split_message_id(msg.id)
    if parts is None or parts[0] != msg.src:
        return f"result id {msg.id[:100]!r} is not '{msg.src[:100]}.<pid>.<seq>'"
    if msg.task is None:
        return "result names no task"
    body = msg.body
    if not isinstance(body, dict):
        return f"result body is {type(body).__name__}, not an object"
    if type(body.get("ok")) is not bool:
        return "result field 'ok' is missing or not true/false"
    for key in ("error", "stderr"):
        if body.get(key) is not None and type(body[key]) is not str:
            return f"result field {key!r} is not a string"
    seconds = body.get("seconds", 0.0)
    if type(seconds) not in (int, float) or not 0 <= seconds < float("inf"):
        return f"result field 'seconds' = {str(seconds)[:40]} is not a number >= 0"
    for key in ("peers_received", "peers_sent"):
        if not _is_count(body.get(key, 0)):
            return f"result field {key!r} = {str(body[key])[:40]} is not an integer >= 0"
    if not isinstance(body.get("counters", {}), dict):
        return "result field 'counters' is not an object"
    if not isinstance(body.get("fallbacks", []), list):
        return "result field 'fallbacks' is not a list"
    if body.get("failure") is not None and body["failure"] not in FAILURES:
        return f"result field 'failure' = {str(body['failure'])[:40]!r} is not one of {', '.join(FAILURES)}"
    after = body.get("retry_after")
    if after is not None and (type(after) not in (int, float) or not 0 <= after < 86_400 * 7):
        return f"result field 'retry_after' = {str(after)[:40]} is not a number of seconds >= 0"
    if body.get("usage") is not None and check_usage(body["usage"]) is None:
        return "result field 'usage' is not an object of numbers >= 0"
    return None


#: failure classes a result may carry (cfn_core.agent.CommandFailed, RateLimited)
FAILURES = ("error", "retry", "fatal", "rate_limited", "timeout", "stalled", "oom")


class CoordinatorContext:
    """What coordinator-side hooks get as ``ctx``.

    Besides the common attributes (``config``, ``hook``, ``bus``, ``route``,
    ``metrics``, ``state``), plugins use: ``agents`` (id -> :class:`AgentHandle`),
    ``launch``, ``new_handle``, ``wait_ready``, ``spawn_report``, ``pump``,
    ``stop_agents``, ``kill``, ``reap``, ``round_state`` (cleared every round),
    ``rounds_started`` (rounds begun in this session: the number of the current
    one, which its messages carry) and ``run_ref`` (what an agent needs to attach
    to the bus).
    """

    side = "coordinator"

    def __init__(self, config: Config, pm, metrics: Metrics):
        self.config = config
        self.pm = pm
        self.hook = pm.hook
        self.metrics = metrics
        self.self_id = self.agent_id = COORDINATOR_ID
        self.bus = None
        self.run_ref: str | None = None
        self.agents: dict[str, AgentHandle] = {}
        self.state: dict[str, Any] = {}
        self.round_state: dict[str, Any] = {}
        self.rounds_started = 0
        self.factory = MessageFactory(COORDINATOR_ID)
        self.counters: dict[str, int] = defaultdict(int)
        self.fallbacks: dict[str, dict] = {}
        self.figures = AgentFigures()  # agents' plugin counters (agent_counters)
        self.spawn_failures: dict[str, str] = {}
        self._early_ready: dict[str, Message] = {}  # ready messages that arrived before their launch returned
        self._directory: dict[str, dict] | None = None  # what write_directory last wrote
        self._directory_warned = False
        self._routes: dict[str, str] = {}
        self._selector = selectors.DefaultSelector()
        self._round: _Round | None = None
        self._in_execute = False
        self._next_tick = 0.0
        #: called (no arguments) whenever an agent is launched or becomes ready: live spawn progress
        self.on_spawn_progress: Callable[[], None] | None = None
        #: the event log (docs/EVENTS.md); one that writes nothing unless the Coordinator got ``events``
        self.events: EventLog = open_event_log(None)
        self.live = Live()  # the snapshot `cfn top` reads and the stop request of `cfn stop`
        #: what the session's tasks spent (an accounting plugin adds to it, a budget reads it)
        self.usage = Usage()

    # ------------------------------------------------------------------ helpers for plugins

    def route(self, agent_id: str) -> str:
        loc = self._routes.get(agent_id)
        if loc is None:
            loc = self._routes[agent_id] = self.hook.cfn_route(agent_id=agent_id, config=self.config)
        return loc

    def send(self, messages: list[Message], flush: bool = False) -> None:
        """Hand messages to ``cfn_send`` (and count them); ``flush``: see the hook."""
        if messages:
            self.counters["sent"] += len(messages)
            tasks = sum(1 for m in messages if m.kind == "task")
            if tasks:  # the metric counts workload messages, like the summary (not stop/ping)
                self.metrics.messages_sent.inc(tasks)
            self.hook.cfn_send(ctx=self, messages=messages, flush=flush)

    def agent_counters(self, prefix: str = "") -> dict[tuple[str, str], dict[str, int]]:
        """The latest counters of every agent process, for a plugin's ``cfn_report``.

        ``{(agent id, "<agent>.<pid>"): {counter: value}}`` with the counters whose
        name starts with ``prefix`` (a plugin's own, e.g. ``"batch."``).  An agent that
        exited normally is counted to its end (the final counters it left on exit);
        a live one as of its latest result, which leaves out what it counted while
        sending that result and since (see :mod:`cfn_core.figures`).
        """
        self.figures.take_exit_states(self.bus, self.agents.values())
        return self.figures.snapshots(prefix)

    def has_room(self, handle: AgentHandle) -> bool:
        """Whether ``handle`` may be sent another task now: it holds fewer than ``[workload] prefetch``.

        A pooling plugin's ``cfn_assign`` asks this rather than "nothing outstanding", so that
        with ``prefetch > 1`` an agent's next task is already in its inbox when it finishes one.
        """
        return len(handle.outstanding) < self.config.workload.prefetch

    def note_status(self, handle: AgentHandle) -> None:
        """An agent's status message was stored in ``handle.info["status"]``: log it.

        The handler of ``status`` messages calls this after updating the handle; ``cfn top``
        reads the stored status from the snapshot, the event log gets ``agent_status``.
        """
        status = handle.info.get("status")
        text, fields = (status.get("text"), status.get("fields")) if isinstance(status, dict) else (status, None)
        self.events.emit("agent_status", agent=handle.id, text=text, fields=fields)

    def not_started(self, task: Task, reason: str) -> None:
        """Report a task of the round as never started (a budget ran out), instead of sending it.

        It fails with the error ``not started: <reason>`` and 0 attempts; the dispatch
        moves on to the next task.  A run whose only failures are such tasks exits with
        status 4 (:attr:`cfn_core.CoordinationResult.exit_code`).  Call it from
        ``cfn_assign`` and return ``False``.
        """
        r = self._round
        if r is None or task.id not in r.tasks or task.id in r.results:
            return
        error = f"{NOT_STARTED}{reason}"
        r.settle(task.id, TaskResult(task=task.id, ok=False, error=error, attempts=r.attempts.get(task.id, 0), answered=False))
        self.metrics.task_failures.inc()
        self.events.emit("task_failed", task=task.id, round=r.number, agent=None, attempt=r.attempts.get(task.id, 0), seconds=None, latency=None, error=error)

    def note_fallback(self, hook: str, plugin: str | None, exc: BaseException) -> None:
        from .fallback import record_fallback

        record_fallback(self, hook, plugin, exc)

    def new_handle(self, agent_id: str, pid: int, popen: Any = None) -> AgentHandle:
        """Make the handle ``cfn_launch_agent`` returns (opens the pidfd that watches the process)."""
        return AgentHandle(id=agent_id, pid=pid, pidfd=pidfd_open(pid), popen=popen)

    def launch(self, agent_id: str) -> AgentHandle:
        """Start one agent through ``cfn_launch_agent`` and watch it.  Does not wait for ready."""
        check_agent_id(agent_id)
        previous = self.agents.get(agent_id)
        if previous is not None and previous.alive:
            raise CfnError(f"agent {agent_id} is already running (pid {previous.pid})")
        with interrupts_deferred():  # an agent started but not recorded would outlive the run
            handle = self.hook.cfn_launch_agent(ctx=self, agent_id=agent_id)
            self.agents[agent_id] = handle
        if previous is not None:
            handle.incarnation = previous.incarnation + 1
            handle.outstanding = previous.outstanding
            now = time.monotonic()
            for task_id in handle.outstanding:
                handle.outstanding[task_id] = now  # the timeout runs from the relaunch
        self.spawn_failures.pop(agent_id, None)
        self.events.emit("agent_started", agent=agent_id, pid=handle.pid, incarnation=handle.incarnation)
        self.metrics.agents.inc()
        self.counters["launched"] += 1
        if self.on_spawn_progress is not None:
            self.on_spawn_progress()
        if handle.pidfd is None:
            if handle.remote is None:
                self._reap(handle)
        else:
            self._selector.register(handle.pidfd, selectors.EVENT_READ, handle)
        early = self._early_ready.pop(agent_id, None)
        if early is not None and handle.alive:
            self._on_ready(early, handle, time.monotonic())
        return handle

    def wait_ready(self, agent_ids: Iterable[str], timeout: float) -> SpawnReport:
        """Pump the bus until every agent in ``agent_ids`` is ready or gone.

        Agents still starting after ``timeout`` seconds are killed and reported.
        """
        ids = list(agent_ids)
        deadline = time.monotonic() + timeout
        while True:
            pending = [a for a in ids if a in self.agents and self.agents[a].state == "starting"]
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for agent_id in pending:
                    self.spawn_failures[agent_id] = f"not ready within {timeout:g}s"
                    self.kill(self.agents[agent_id], f"not ready within {timeout:g}s")
                self._await_exit([self.agents[a] for a in pending], 1.0)
                break
            self.pump(min(remaining, _TICK))
        return self.spawn_report(ids)

    def spawn_report(self, agent_ids: Iterable[str]) -> SpawnReport:
        """Which of ``agent_ids`` are ready, and why the others are not."""
        report = SpawnReport()
        space_note = None
        for agent_id in agent_ids:
            handle = self.agents.get(agent_id)
            if handle is not None and handle.state == "ready":
                report.ready.append(agent_id)
            elif handle is not None and handle.alive:
                report.failed[agent_id] = self.spawn_failures.get(agent_id) or f"not ready yet ({handle.state})"
            else:
                reason = self.spawn_failures.get(agent_id)
                if reason is None and handle is None:
                    reason = "never launched"
                elif reason is None:
                    if space_note is None:
                        space_note = self._bus_space_note()
                    reason = f"exited with status {handle.exit_code} before it was ready{space_note}"
                # kept for the round's summary, which lists every agent that never became ready
                report.failed[agent_id] = self.spawn_failures[agent_id] = reason
        return report

    def _bus_space_note(self) -> str:
        """'; the bus root has only 8 KiB free' when the bus is (nearly) out of space, else ''.

        An agent that cannot write its ready message to a full bus dies with the reason
        on its own stderr only; this puts the likely cause where the summary shows it.
        """
        free = self.bus.free_bytes()
        if free is None or free >= _LOW_SPACE_BYTES:
            return ""
        return f"; the bus is full: its root {os.path.dirname(self.bus.run_ref)} has only {free // 1024} KiB free"

    def kill(self, handle: AgentHandle, reason: str) -> None:
        """SIGKILL an agent (its death is then handled like any other)."""
        if not handle.alive:
            return
        handle.killed_reason = reason
        if handle.remote is not None:
            handle.remote.kill(handle, reason)
            return
        try:
            if handle.pidfd is not None:
                signal.pidfd_send_signal(handle.pidfd, signal.SIGKILL)
            else:
                os.kill(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_agents(self, agent_ids: Iterable[str]) -> None:
        """Ask agents to exit, wait ``[run] shutdown_timeout``, kill what is left."""
        handles = [self.agents[a] for a in agent_ids if a in self.agents and self.agents[a].alive]
        stops = []
        for handle in handles:
            if handle.state != "stopping":
                handle.state = "stopping"
                stops.append(self.factory.make(handle.id, "stop"))
        try:
            self.send(stops)
        except CfnError as exc:
            log.warning("could not ask agents to stop (%s); killing them", exc)
            for handle in handles:
                self.kill(handle, "could not be asked to stop")
        self._await_exit(handles, self.config.run.shutdown_timeout)

    def _await_exit(self, handles: list[AgentHandle], timeout: float) -> None:
        """Wait for ``handles`` to exit; SIGKILL whatever is left after ``timeout``."""
        deadline = time.monotonic() + timeout
        killed_at = None
        while any(h.alive for h in handles):
            now = time.monotonic()
            if killed_at is None and now >= deadline:
                for h in handles:
                    self.kill(h, "did not exit in time")
                killed_at = now
            elif killed_at is not None and now - killed_at > 10.0:
                log.error("agents %s survive SIGKILL; giving up on them", [h.pid for h in handles if h.alive])
                break
            self.pump(_TICK)

    # ------------------------------------------------------------------ the event loop

    def pump(self, timeout: float | None) -> None:
        """Flush, sleep until a message or an agent death (or ``timeout``), then handle both."""
        self.hook.cfn_flush(ctx=self, reason="explicit")
        events = self._selector.select(timeout)
        died = []
        for key, _ in events:
            data = key.data
            if data is None:
                self.bus.drain_wakeups(COORDINATOR_ID)
            elif isinstance(data, AgentHandle):
                died.append(data)
            else:  # a waker (cfn_core.feed): work submitted from another thread
                data.on_wake()
        self._drain_inbox()
        if died:
            self._drain_inbox()  # a result written just before the death is read first
            for handle in died:
                self._reap(handle)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + _TICK
            self.write_directory()  # agents ready or gone since the last tick
            self._watchdog(now)
            self._requeue_due(now)
            self.live.tick(self, now)  # event log flush, messages per interval, snapshot, stop request
            self.hook.cfn_tick(ctx=self, now=now)

    def _drain_inbox(self) -> None:
        t0 = time.perf_counter()
        messages = self.hook.cfn_read(ctx=self, agent_id=COORDINATOR_ID)
        if not messages:
            return
        now = time.monotonic()
        self.counters["received"] += len(messages)
        for msg in messages:
            handle = self.agents.get(msg.src)
            if handle is not None:
                handle.last_seen = now
                handle.info["messages_out"] = handle.info.get("messages_out", 0) + 1
            kind = msg.kind
            if kind == "result":
                self._on_result(msg, handle, now)
            elif kind == "ready":
                self._on_ready(msg, handle, now)
            elif kind == "pong" and handle is not None:
                handle.info["pong_at"] = now
            elif kind == "status" and handle is not None:
                self._on_status(msg, handle, now)
            elif kind == "retiring" and handle is not None:
                self._on_retiring(msg, handle)
            else:
                self.counters["unexpected"] += 1
        self.bus.ack(COORDINATOR_ID, [m.receipt for m in messages])
        if self._in_execute and self._round is not None:
            self._round.collect += time.perf_counter() - t0

    def _on_status(self, msg: Message, handle: AgentHandle, now: float) -> None:
        """An agent's ``agent.status(text, **fields)``: the last one is kept on its handle."""
        body = msg.body if isinstance(msg.body, dict) else {}
        text, fields = body.get("text"), body.get("fields")
        if not isinstance(text, str) or not isinstance(fields, dict):
            self.counters["unexpected"] += 1
            return
        handle.info["status"] = {"text": text[:1000], "fields": fields}
        handle.info["status_at"] = now
        handle.info["statuses"] = handle.info.get("statuses", 0) + 1
        self.counters["status"] += 1
        self.note_status(handle)  # the event log's agent_status; cfn top reads it from the snapshot

    def write_directory(self) -> None:
        """Publish the run's agents (bus state ``directory``) when the set changed since the last write.

        The document is :func:`cfn_core.roles.directory_document`'s (every reachable agent
        with its role).  Agents read it lazily (``agent.peers()``, ``agent.send``).
        """
        if self.bus is None:
            return
        document = directory_document(self)
        agents = document["agents"]
        if agents != self._directory:
            try:
                self.bus.put_state("directory", json.dumps(document, sort_keys=True).encode())
            except (CfnError, OSError) as exc:  # a full bus: the run goes on, agents keep the last copy
                if not self._directory_warned:
                    log.info("could not write the run's directory (tried again every tick): %s", exc)
                    self._directory_warned = True
                return
            self._directory = agents

    def _on_ready(self, msg: Message, handle: AgentHandle | None, now: float) -> None:
        if handle is None or handle.state == "exited":
            # a launcher that starts agents ahead of their launch (cfn-pool's zygote pipelining):
            # kept until launch() registers the handle, which checks the pid
            self._early_ready[msg.src] = msg
            return
        if handle.state != "starting":
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if handle.pid is not None and body.get("pid") not in (None, handle.pid):
            return  # from an earlier incarnation
        handle.state = "ready"
        handle.ready_at = now
        self.metrics.spawn_seconds.observe(now - handle.launched_at)
        self.counters["ready"] += 1
        self.events.emit("agent_ready", agent=handle.id, pid=handle.pid, seconds=round(now - handle.launched_at, 6))
        self.hook.cfn_agent_started(ctx=self, agent=handle)
        if self.on_spawn_progress is not None:
            self.on_spawn_progress()

    def _on_result(self, msg: Message, handle: AgentHandle | None, now: float) -> None:
        r = self._round
        problem = result_problem(msg)
        if problem is not None:
            self._reject_result(msg, problem)
            return
        body = msg.body
        if handle is not None:  # an agent of the run: its plugins' counters and fallbacks
            pid = split_message_id(msg.id)[1]
            if "counters" in body:
                self.figures.take_result(msg.src, f"{msg.src}.{pid}", msg.seq, body["counters"])
            if "fallbacks" in body:
                from .fallback import merge_agent_fallbacks

                merge_agent_fallbacks(self, (msg.src, pid), body["fallbacks"])
        if r is None or msg.round != r.number or msg.task not in r.tasks:
            self.counters["stale_results"] += 1
            if handle is not None and (r is None or msg.task not in r.tasks):
                handle.outstanding.pop(msg.task, None)  # a late answer from an interrupted round
            return
        assignee = r.assigned.get(msg.task)
        if msg.src != assignee:
            # a stray or buggy process: it must not replace (or pre-empt) the real result
            self._reject_result(
                msg,
                f"result for task {msg.task} from {msg.src!r}, but the task "
                + (f"was sent to {assignee!r}" if assignee else "has not been sent to any agent"),
            )
            return
        handle.outstanding.pop(msg.task, None)
        if msg.task in r.results:
            if not r.results[msg.task].cancelled:  # a cancelled task's late answer is expected
                r.result.duplicates += 1
            return
        task = r.tasks[msg.task]
        if not body["ok"] and self._retry_failed(r, task, msg.src, body, now):
            return
        error = body.get("error")
        if not body["ok"] and r.history.get(msg.task):  # the summary says what every attempt ended with
            error = f"{error} [earlier attempts: " + "; ".join(r.history[msg.task]) + "]"
        r.settle(msg.task, TaskResult(
            task=msg.task,
            ok=body["ok"],
            value=body.get("value"),
            error=error,
            agent=msg.src,
            attempts=r.attempts.get(msg.task, 0) + 1,
            peers_received=min(body.get("peers_received", 0), task.expect),
            seconds=float(body.get("seconds", 0.0)),
            stderr=body.get("stderr"),
        ))
        if not r.results[msg.task].ok:
            self.metrics.task_failures.inc()  # as the summary's "failed" counts it
        sent = r.sent_at.get(msg.task)
        if sent is not None:
            r.latencies.append(now - sent)
        self.events.emit(
            "task_done" if body["ok"] else "task_failed", task=msg.task, round=r.number, agent=msg.src,
            attempt=r.results[msg.task].attempts, seconds=round(r.results[msg.task].seconds, 6),
            latency=None if sent is None else round(now - sent, 6), error=error,
        )
        peers_sent = min(body.get("peers_sent", 0), len(task.peers))  # no more than it was asked to send
        r.peers_sent += peers_sent
        # live counters that end equal to the round's figures: the result and the peer messages
        # its agent sent; delivered: the task (its result proves it), the result, its peers received
        self.metrics.messages_sent.inc(1 + peers_sent)
        self.metrics.messages_delivered.inc(2 + r.results[msg.task].peers_received)
        self.hook.cfn_task_result(ctx=self, task=task, agent_id=msg.src, outcome="done" if body["ok"] else "failed", body=body)

    # ------------------------------------------------------------------ failure policy

    def _on_retiring(self, msg: Message, handle: AgentHandle) -> None:
        """An agent leaves for a fresh process (``[workload] max_tasks`` / ``max_rss_mb``): expect its exit."""
        body = msg.body if isinstance(msg.body, dict) else {}
        if handle.state != "ready" or body.get("pid") not in (None, handle.pid):
            return
        handle.state = "stopping"  # its exit is a stop, not a death: no attempt is charged
        handle.info["recycling"] = str(body.get("why"))[:200]
        self.counters["recycled"] += 1

    def _replace_recycled(self, handle: AgentHandle) -> None:
        """Start the successor of a recycled agent under its id: it re-reads what its predecessor left queued."""
        if self._round is None and not handle.outstanding:
            return  # between rounds: a pool refills as it does for any agent that left
        try:
            self.launch(handle.id)
        except Exception as exc:
            log.warning("recycled agent %s could not be replaced: %s", handle.id, exc)
            if handle.outstanding and self._round is not None:
                for task_id in list(handle.outstanding):
                    self._give_up(handle, task_id, f"agent {handle.id} was recycled and could not be replaced: {exc}")

    def _retry_failed(self, r: _Round, task: Task, agent_id: str, body: dict, now: float) -> bool:
        """A failed result: re-queue its task with backoff if the failure policy says so.

        ``rate_limited`` is re-queued without charging an attempt (up to ``[workload]
        max_rate_limited`` times), after ``retry_after`` or the backoff; ``retry`` and
        ``stalled`` are charged an attempt and re-queued until ``max_attempts``.
        Returns True when the task was re-queued (no result is recorded).
        """
        failure = body.get("failure")
        w = self.config.workload
        error = body.get("error") or failure
        if failure == "rate_limited":
            r.rate_limited[task.id] += 1
            n = r.rate_limited[task.id]
            if n > w.max_rate_limited:
                r.history[task.id].append(f"rate limited {n - 1} times (max_rate_limited = {w.max_rate_limited})")
                return False
            after = body.get("retry_after")
            delay = float(after) if after is not None else self._backoff(n)
            reason = f"rate limited (not charged as an attempt; #{n}): {error}"
        elif failure in ("retry", "stalled"):
            attempts = r.attempts[task.id] + 1  # the attempt that just failed
            if attempts >= role_of(self.config, agent_id).max_attempts:
                return False  # its result is the last attempt's: recorded with the earlier ones' reasons
            r.attempts[task.id] = attempts
            r.history[task.id].append(f"{attempts}: {error}")
            delay = self._backoff(attempts)
            reason = f"attempt {attempts} failed ({failure}): {error}"
            r.result.retries += 1
            self.metrics.task_retries.inc()
        else:
            return False
        heapq.heappush(r.requeue, (now + delay, task.id))
        self.events.emit("task_retried", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1, reason=f"{reason}; again in {delay:.3g}s")
        self.hook.cfn_task_result(ctx=self, task=task, agent_id=agent_id, outcome="requeued", body=body)
        return True

    def _backoff(self, n: int) -> float:
        """Seconds before the ``n``-th retry: exponential from ``retry_backoff``, capped, full jitter over its upper half."""
        w = self.config.workload
        ceiling = min(w.retry_backoff_max, w.retry_backoff * 2 ** min(n - 1, 30))
        return ceiling * (0.5 + 0.5 * random.random())

    def _requeue_due(self, now: float) -> None:
        """Send the re-queued tasks whose backoff is over (the assign hook may still say "not now")."""
        r = self._round
        if r is None or not r.requeue or r.requeue[0][0] > now:
            return
        groups = by_role(self.config, [a for a in r.agent_ids if a in self.agents and self.agents[a].alive])
        batch = []
        while r.requeue and r.requeue[0][0] <= now:
            task = r.tasks[r.requeue[0][1]]
            if task.id in r.results:  # reported not started meanwhile (a budget)
                heapq.heappop(r.requeue)
                continue
            if not groups.get(task.role):  # every agent of its role is gone for good: it cannot run again
                heapq.heappop(r.requeue)
                r.settle(task.id, TaskResult(
                    task=task.id, ok=False, error=f"re-queued, but no agent of role {task.role!r} is left: " + "; ".join(r.history[task.id]),
                    attempts=r.attempts[task.id], answered=False,
                ))
                self.metrics.task_failures.inc()
                self.events.emit("task_failed", task=task.id, round=r.number, agent=None, attempt=r.attempts[task.id], seconds=None, latency=None, error=r.results[task.id].error)
                continue
            agent_id = self.hook.cfn_assign(ctx=self, task=task, agent_ids=groups[task.role])
            if not agent_id:
                break  # not now (a limit, every agent busy): the next tick asks again
            heapq.heappop(r.requeue)
            handle = self.agents[agent_id]
            handle.outstanding[task.id] = now
            r.assigned[task.id] = agent_id
            r.sent_at[task.id] = now
            self.events.emit("task_assigned", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1)
            batch.append(self.factory.make(agent_id, "task", round=r.number, task=task.id, body=task.body()))
        self.send(batch)

    def _reject_result(self, msg: Message, reason: str) -> None:
        """Dead-letter a result record that cannot be accepted (counted in ``dead_lettered``)."""
        self.counters["rejected_results"] += 1
        log.warning("result %s dead-lettered: %s", msg.id[:100], reason)
        self.bus.dead_letter(COORDINATOR_ID, msg.encode(), reason)

    def reap(self, handle: AgentHandle, exit_code: int | None = None) -> None:
        """A plugin learned that a remote agent ended: handle it like a death seen through a pidfd."""
        if handle.alive:
            if exit_code is not None:
                handle.exit_code = exit_code
            self._reap(handle)

    def _reap(self, handle: AgentHandle) -> None:
        if handle.pidfd is not None:
            try:
                self._selector.unregister(handle.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(handle.pidfd)
            handle.pidfd = None
        if handle.popen is not None:
            handle.exit_code = handle.popen.wait()
        was = handle.state
        handle.state = "exited"
        reason = "stopped" if was == "stopping" and not handle.killed_reason else "killed" if handle.killed_reason else "died"
        self.metrics.agents.dec()
        self.metrics.agent_exits.labels(reason=reason).inc()
        self.events.emit("agent_exited", agent=handle.id, pid=handle.pid, reason=reason, exit_code=handle.exit_code, why=handle.killed_reason)
        self.hook.cfn_agent_exited(ctx=self, agent=handle, reason=reason)
        if reason != "stopped" and handle.outstanding and self._round is not None:
            self._recover(handle)
        elif handle.info.pop("recycling", None) is not None and reason == "stopped":
            self._replace_recycled(handle)

    def _recover(self, handle: AgentHandle) -> None:
        """An agent died with work outstanding: charge the task it was running, relaunch it."""
        r = self._round
        stale = [t for t in handle.outstanding if t not in r.tasks or t in r.results]
        for t in stale:
            del handle.outstanding[t]
        if handle.info.pop("cancelled_kill", None) is not None:
            # killed because a cancelled task did not stop: the tasks it held besides are not to
            # blame (no attempt charged), and the agent is replaced even if it held nothing else
            r.result.retries += len(handle.outstanding)
            for task_id in handle.outstanding:
                self.events.emit("task_retried", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id] + 1, reason=handle.killed_reason)
            try:
                self.launch(handle.id)
            except Exception as exc:
                for task_id in list(handle.outstanding):
                    self._give_up(handle, task_id, f"agent {handle.id} was killed and could not be replaced: {exc}")
            return
        culprit = next(iter(handle.outstanding))
        r.attempts[culprit] += 1
        why = handle.killed_reason or (
            f"agent {handle.id} died" + (f" with status {handle.exit_code}" if handle.exit_code is not None else "")
        )
        if r.attempts[culprit] >= role_of(self.config, handle.id).max_attempts:  # its role's, else [workload]'s
            self._give_up(handle, culprit, f"gave up after {r.attempts[culprit]} attempts: {why}")
        if not handle.outstanding:
            if r.distributing:
                # tasks still wait for an agent (a plugin that hands them out one per idle agent):
                # without this one the round could be left with none and wait for ever
                try:
                    self.launch(handle.id)
                except Exception as exc:
                    log.warning("agent %s died and could not be replaced: %s", handle.id, exc)
            return
        r.result.retries += len(handle.outstanding)
        self.metrics.task_retries.inc(len(handle.outstanding))
        for task_id in handle.outstanding:
            self.events.emit("task_retried", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id] + 1, reason=why)
        try:
            self.launch(handle.id)
        except Exception as exc:  # cannot replace it: everything it held fails, with the reason
            for task_id in list(handle.outstanding):
                self._give_up(handle, task_id, f"agent {handle.id} died and could not be replaced: {exc}")

    def _give_up(self, handle: AgentHandle, task_id: str, reason: str) -> None:
        r = self._round
        handle.outstanding.pop(task_id, None)
        if task_id not in r.results:
            r.settle(task_id, TaskResult(task=task_id, ok=False, error=reason, agent=handle.id, attempts=r.attempts[task_id], answered=False))
        self.metrics.task_failures.inc()
        self.events.emit("task_failed", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id], seconds=None, latency=None, error=reason)
        # keyed by the session-wide round (see cfn_core.agent.read_skip_list): a later run
        # that submits the same task id gets it run again
        key = f"skip.{handle.id}"
        try:
            skip = json.loads(self.bus.get_state(key) or b"{}")
        except ValueError:
            skip = {}
        if not isinstance(skip, dict):
            skip = {}
        skip[str(r.number)] = sorted(set(skip.get(str(r.number), [])) | {task_id})
        self.bus.put_state(key, json.dumps(skip).encode())

    def _watchdog(self, now: float) -> None:
        """Kill agents whose oldest task has run longer than ``[workload] timeout``.

        A task's time runs from when its agent was ready for it: an agent still starting
        (the replacement of one that died, which inherits its tasks) is held to
        ``[run] spawn_timeout`` instead, so a slow start-up on a loaded machine is not
        charged to the tasks it inherited.
        """
        if self._round is None:
            return
        spawn_limit = self.config.run.spawn_timeout
        for handle in self.agents.values():
            if not handle.outstanding or not handle.alive or handle.killed_reason:
                continue
            if handle.state == "starting":
                if now - handle.launched_at > spawn_limit:
                    self.kill(handle, f"not ready within {spawn_limit:g}s")
                continue
            role = role_of(self.config, handle.id)  # its role's timeout, else [workload]'s
            limit = role.timeout
            # a command agent enforces the timeout itself (it kills the command's process
            # group and reports its stderr): give it time to do so before killing the
            # agent, which would orphan the command and lose the stderr
            grace = max(1.0, 0.25 * limit) if role.command else 0.0
            oldest_task, sent = next(iter(handle.outstanding.items()))
            started = max(sent, handle.last_seen, handle.ready_at or 0.0)
            if now - started > limit + grace:
                self.kill(handle, f"task {oldest_task} exceeded the {limit:g}s timeout")
            elif self.config.workload.stall_seconds and not role.command:  # a command's agent watches its output itself
                self._check_stall(handle, oldest_task, now - started)

    def _check_stall(self, handle: AgentHandle, task_id: str, silent: float) -> None:
        """A handler's agent silent (no status, no message to the coordinator) for ``stall_seconds``:
        marked stalled, then killed ``stall_kill_seconds`` later (its task is retried, an attempt)."""
        w = self.config.workload
        if silent < w.stall_seconds:
            handle.info.pop("stalled", None)
            return
        if handle.info.get("stalled") != task_id:
            handle.info["stalled"] = task_id
            handle.info["status"] = {"text": "stalled", "fields": {"task": task_id, "silent_seconds": round(silent, 3)}}
            self.note_status(handle)
        if silent >= w.stall_seconds + w.stall_kill_seconds:
            self.kill(
                handle,
                f"task {task_id} stalled: no status or message from its agent for {silent:.3g}s "
                f"(stall_seconds = {w.stall_seconds:g}, stall_kill_seconds = {w.stall_kill_seconds:g})",
            )


def _check_task(task: Task) -> None:
    """The shape of a task given to ``run``: a string id, peers that are agent ids, a count."""
    if not isinstance(task.id, str) or not task.id:
        raise ConfigError(f"task id {task.id!r} is not allowed: a task id is a non-empty string")
    if isinstance(task.peers, str) or not isinstance(task.peers, (tuple, list)):
        raise ConfigError(f"task {task.id!r}: peers = {task.peers!r} must be a list of agent ids")
    for peer in task.peers:
        try:
            check_agent_id(peer)
        except ConfigError as exc:
            raise ConfigError(f"task {task.id!r}: peer {exc}") from None
    if not _is_count(task.expect):
        raise ConfigError(f"task {task.id!r}: expect = {task.expect!r} must be an integer >= 0 (peer messages to wait for)")


class Coordinator:
    """Runs coordinations.  Use as a context manager so agents and the bus are always cleaned up::

        with Coordinator(load_config("cfn.toml")) as coord:
            result = coord.run()

    :param config: a :class:`~cfn_core.config.Config` (default: :func:`load_config`).
    :param progress: ``callback(phase, done, total)`` for progress displays.  While agents
        start it is called on every launch and every ready message, with ``("started",
        launched, total)`` then ``("spawn", ready, total)`` (``total`` 0 while a plugin
        pre-spawns before the first round); later phases are ``distribute`` and ``collect``.
    :param extra_plugins: plugin objects to register besides the enabled ones (tests,
        embedding applications); coordinator side only, agents do not load them.
    :param events: where to write the event log (docs/EVENTS.md): a path (truncated),
        ``"-"`` for stdout, an open file object, or an :class:`~cfn_core.events.EventLog`;
        None (the default) writes none.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        progress: Callable[[str, int, int], None] | None = None,
        extra_plugins: Iterable[Any] = (),
        events: Any = None,
    ):
        self.config = config or load_config()
        self.extra_plugins = list(extra_plugins)
        w = self.config.workload
        if w.agents > self.config.run.max_agents:
            raise ConfigError(
                f"[workload] agents = {w.agents} exceeds [run] max_agents = {self.config.run.max_agents}; "
                "raise max_agents if you mean it"
            )
        if w.topology == "mesh" and w.tasks and w.tasks > w.agents:
            raise ConfigError(
                f"[workload] tasks = {w.tasks} with topology = 'mesh': a mesh needs every task on its own agent "
                f"(tasks <= agents = {w.agents})"
            )
        if w.topology == "mesh" and w.messages_per_agent and w.agents < 2:
            raise ConfigError("[workload] topology = 'mesh' with messages_per_agent > 0 needs agents >= 2")
        if w.payload_bytes + 512 > self.config.bus.max_message_bytes:
            raise ConfigError(
                f"[workload] payload_bytes = {w.payload_bytes} does not fit in a message: "
                f"[bus] max_message_bytes = {self.config.bus.max_message_bytes} (allow ~512 bytes of envelope)"
            )
        self._check_mesh_fan_in()
        # found now, not after the run when the file is written (or a task runs)
        metrics_file = self.config.run.metrics_file
        if metrics_file:
            parent = os.path.dirname(os.path.abspath(metrics_file))
            if os.path.isdir(metrics_file):
                raise ConfigError(f"[run] metrics_file = {metrics_file!r} is a directory; name a file in it, e.g. {os.path.join(metrics_file, 'cfn.prom')!r}")
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise ConfigError(
                    f"[run] metrics_file = {metrics_file!r}: directory {parent} does not exist or is not writable"
                )
        if w.directory and not os.path.isdir(w.directory):
            raise ConfigError(
                f"[workload] directory = {w.directory!r}: no such directory (handler modules are imported "
                "from it and commands run in it)"
            )
        self.progress = progress
        self.events = open_event_log(events)  # opened now: a path that cannot be written fails before anything starts
        #: seconds the session took to open (plugins, bus, a pool's pre-spawn) and to close
        self.open_seconds = 0.0
        self.close_seconds = 0.0
        self._spawn_window: tuple[int, int, int, float] | None = None
        self.pm = None
        self.ctx: CoordinatorContext | None = None
        self.partial: CoordinationResult | None = None
        self._metrics_server = None
        self._handler = None
        self._janitor: Janitor | None = None
        self._feed = None  # the feed thread (cfn_core.feed) while submitted tasks may run
        self._partial_from: int | None = None  # an interrupted workflow's first feed round
        self._feed_lock = threading.Lock()
        #: the open-ended rounds of submitted tasks, one per feed (what ``submit`` ran)
        self.feed_rounds: list[RoundResult] = []

    def _check_mesh_fan_in(self) -> None:
        """Refuse, before anything starts, a mesh whose peer messages cannot fit in the inboxes.

        The same figure is checked again per round (the tasks given to ``run`` may differ
        from the configured ones); here it is the configured workload, so that `cfn run`
        fails with exit status 2 before it spawns a single agent.
        """
        w = self.config.workload
        depth = self.config.bus.inbox_depth
        n = w.tasks or w.agents
        if w.topology != "mesh" or not w.messages_per_agent or not depth or n < 2:
            return
        if n * w.messages_per_agent * w.rounds > 5_000_000:
            return  # too costly to plan ahead; each round still checks its own plan
        for number in range(1, w.rounds + 1):
            expect = [0] * n
            for row in mesh_peer_indices(n, w.messages_per_agent, w.seed, number):
                for j in row:
                    expect[j] += 1
            if max(expect) + 1 > depth:
                raise ConfigError(mesh_depth_message(number, max(expect), w.messages_per_agent, depth))

    # ------------------------------------------------------------------ session

    def __enter__(self) -> "Coordinator":
        self.open()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # like Executor.shutdown(wait=True): submitted tasks finish first, unless the block failed
        self.close(wait=exc_type is None)

    def open(self) -> None:
        """Load plugins, open the bus, start session helpers (pool)."""
        if self.ctx is not None:
            return
        t0 = time.perf_counter()
        try:
            self._open()
        finally:
            self.open_seconds = time.perf_counter() - t0

    def _open(self) -> None:
        from .agent import load_handler

        for role in roles_of(self.config).values():  # a handler that cannot be imported fails here, not in 500 agents
            load_handler(role)
        self.pm = make_plugin_manager(self.config, self.extra_plugins)
        metrics = Metrics()
        ctx = self.ctx = CoordinatorContext(self.config, self.pm, metrics)
        self.events.reopen()
        ctx.events = self.events
        ctx.on_spawn_progress = self._spawn_progress
        self._spawn_window = (0, 0, 0, time.monotonic())  # a plugin's pre-spawn (pool): no known total
        ensure_fds_for_agents(process_agents(self.config), f"{self.config.workload.agents} agents")
        try:
            with interrupts_deferred():  # a run directory made but not recorded would never be removed
                ctx.bus = self.pm.hook.cfn_bus(config=self.config, run_ref=None)
            ctx.run_ref = ctx.bus.run_ref
            with interrupts_deferred():  # started but not recorded, it would wait forever for its end of file
                self._janitor = Janitor(ctx.run_ref)  # kills what the run's agents leave, even after our SIGKILL
            ctx.events.emit(
                "run_started", run=ctx.run_ref, bus=ctx.bus.name, plugins=self.config.enabled(),
                agents=self.config.workload.agents, pid=os.getpid(),
            )
            ctx.bus.put_state("config", self.agent_config_document())
            ctx.bus.listen(COORDINATOR_ID)
            ctx._selector.register(ctx.bus.wake_fd(COORDINATOR_ID), selectors.EVENT_READ, None)
            if self.config.run.metrics_port:
                self._metrics_server = metrics.serve(self.config.run.metrics_port)
            self.pm.hook.cfn_session_start(ctx=ctx)
        except BaseException:
            self.close()
            raise

    def agent_config_document(self) -> bytes:
        """What agents load: the resolved configuration and where the enabled plugins live."""
        from .plugins import plugin_modules

        doc = {"config": self.config.to_dict(), "plugin_modules": plugin_modules(self.config.enabled())}
        return json.dumps(doc).encode()

    def close(self, wait: bool = True) -> None:
        """Stop every agent, the session helpers and the bus; remove the run directory.

        :param wait: let submitted tasks finish first (False: they fail with "closed").
        """
        if self.ctx is None:
            return
        t0 = time.perf_counter()
        interrupt = None
        if wait and self._feed is not None:
            # waited for here, where Ctrl-C still interrupts: it then closes without waiting
            from concurrent.futures import wait as wait_for_futures

            try:
                wait_for_futures(self._feed.unfinished())
            except KeyboardInterrupt as exc:
                interrupt, wait = exc, False
        try:
            with interrupts_deferred():  # closing half way would leave agents or the run directory behind
                try:
                    self._stop_feed(wait)
                finally:
                    self._close()
        finally:
            self.close_seconds = time.perf_counter() - t0
        if interrupt is not None:
            raise interrupt

    def _close(self) -> None:
        ctx = self.ctx
        error = None
        try:
            try:
                if ctx.bus is not None:
                    self.pm.hook.cfn_session_finish(ctx=ctx)
            finally:
                live = [h for h in ctx.agents.values() if h.alive]
                if live:
                    if ctx.bus is not None:
                        ctx._round = None
                        ctx.stop_agents([h.id for h in live])
                    else:
                        for h in live:
                            ctx.kill(h, "coordinator closing")
        finally:
            try:
                if self._metrics_server is not None:
                    self._metrics_server.shutdown()
                    self._metrics_server.server_close()
                if self.config.run.metrics_file:
                    try:
                        ctx.metrics.write(self.config.run.metrics_file)
                    except OSError as exc:  # reported once the bus is gone: nothing may outlive a failed close
                        error = CfnError(
                            f"[run] metrics_file = {self.config.run.metrics_file!r}: cannot write it: {exc.strerror}"
                        )
                result = self.partial
                ctx.events.emit(
                    "run_finished", seconds=round(time.time() - ctx.live.started_at, 6),
                    rounds=ctx.rounds_started, done=ctx.events.counts["task_done"],
                    failed=ctx.events.counts["task_failed"], retried=ctx.events.counts["task_retried"],
                    interrupted=bool(result and result.interrupted),
                )
                ctx.events.close()
                if self._janitor is not None:
                    self._janitor.sweep()  # every agent is gone: it sweeps while the run directory is removed
                if ctx.bus is not None:
                    ctx.bus.destroy()
                ctx._selector.close()
                self.ctx = None
            finally:
                if self._janitor is not None:
                    self._janitor.close()  # last, whatever failed: the agents are gone, it kills what they left
                    self._janitor = None
        if error is not None:
            raise error

    # ------------------------------------------------------------------ feed: submit, map, cancel

    def submit(
        self,
        payload: Any,
        *,
        role: str | None = None,
        to: str | None = None,
        after: Iterable[Any] = (),
        timeout: float | None = None,
        id: str | None = None,
    ):
        """Queue one task; return its :class:`concurrent.futures.Future` at once.

        :param payload: any JSON value, handed to the handler.
        :param role: the role whose agents may run it (default: the run's default role).
        :param to: the id of the agent that must run it (of the run's agents).
        :param after: futures of this coordinator the task waits for; it then receives
            ``{"payload": payload, "after": {task id: result}}`` (docs/USER_GUIDE.md).
        :param timeout: seconds the task may take once sent to an agent; then it is cancelled
            and fails with a reason (default: its role's ``timeout``).
        :param id: the task id (default ``t000001``, ...); ``future.task_id`` gives it.

        The coordination runs in a thread of its own while tasks are submitted (see
        :mod:`cfn_core.feed`); use ``concurrent.futures.as_completed`` / ``wait`` /
        ``result(timeout)`` as with any executor.
        """
        if self.ctx is None:
            raise CfnError("submit: the coordinator is closed; submit inside `with Coordinator(config) as coord:`")
        try:
            orjson.dumps(payload)
        except TypeError as exc:
            from .errors import NotJSON

            raise NotJSON(f"submit: the payload is not a JSON value: {exc}") from None
        if role is not None:
            check_role(self.config, role, "submit(role=...)")
        if to is not None:
            check_agent_id(to)
        if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
            raise ConfigError(f"submit(timeout={timeout!r}): a number of seconds > 0, or None")
        with self._feed_lock:  # two threads' first submissions start one feed
            feed = self._feed
            if feed is None:
                from .feed import Feed

                feed = self._feed = Feed(self)
                feed.start()
        future = feed.submit(payload, role, to, after, id)
        if timeout is not None:
            feed.put(("deadline", future.task_id, float(timeout)))
        return future

    def map(self, payloads: Iterable[Any], *, role: str | None = None, timeout: float | None = None):
        """Submit every payload, then yield their results in order (like ``Executor.map``).

        A failed task raises its :class:`~cfn_core.errors.TaskFailed` when its turn comes;
        ``timeout`` bounds the wait for each result.
        """
        futures = [self.submit(p, role=role) for p in payloads]

        def results():
            try:
                for f in futures:
                    yield f.result(timeout)
            finally:
                for f in futures:
                    f.cancel()  # what the caller stopped waiting for is not run

        return results()

    def as_completed(self, futures: Iterable[Any] | None = None, timeout: float | None = None):
        """``concurrent.futures.as_completed`` over ``futures``.

        The default is every submitted task whose outcome was not taken yet: neither its
        ``result()`` nor its ``exception()`` was called and no earlier ``as_completed()``
        yielded it, finished or not (a task that finished before this call is yielded
        first, so nothing submitted is missed).
        """
        from concurrent.futures import as_completed

        if futures is not None:
            return as_completed(futures, timeout)
        feed = self._feed

        def not_taken():
            if feed is None:
                return
            for f in as_completed(feed.not_taken(), timeout):
                feed.untaken.pop(f.task_id, None)
                yield f

        return not_taken()

    def cancel(self, task_id: str) -> bool:
        """Cancel a submitted task, queued or running (docs/USER_GUIDE.md "Cancelling a task").

        :return: True when it was cancelled, False when it had already finished.
        :raises CfnError: no task of that id was submitted.
        """
        feed = self._feed
        if feed is None:
            raise CfnError(f"cancel: no task {task_id!r} was submitted to this coordinator")
        return feed.cancel(task_id)

    def run_workflow(self, tasks: Iterable[Any] | None = None) -> CoordinationResult:
        """Run a task graph (default: the configuration's ``[[tasks]]``) and return the figures.

        Every task is submitted with ``after`` = the futures of its ``needs``; the call
        returns when all have finished, failed, been skipped (a task they need failed) or
        cancelled (``cfn cancel``).  The result has one round: the feed's.

        :param tasks: :class:`~cfn_core.config.WorkflowTask` objects (``id``, ``payload``,
            ``role``, ``needs``), checked like ``[[tasks]]`` (acyclic, known ids).
        """
        from concurrent.futures import wait

        from .config import workflow_tasks

        if self.ctx is None:
            self.open()
            try:
                return self.run_workflow(tasks)
            finally:
                self.close()
        graph = list(self.config.tasks if tasks is None else workflow_tasks([t.to_dict() for t in tasks], "run_workflow", self.config.roles))
        self._stop_feed(wait=True)  # a fresh feed: its round is this workflow's alone
        result = self.partial = CoordinationResult(
            plugins=self.config.enabled(), bus=self.ctx.bus.name, topology=self.config.workload.topology
        )
        first = len(self.feed_rounds)
        t0 = time.perf_counter()
        futures: dict[str, Any] = {}
        try:
            pending = list(graph)
            while pending:  # needs first: a task's after= names futures that exist
                later = []
                for t in pending:
                    if all(n in futures for n in t.needs):
                        futures[t.id] = self.submit(t.payload, role=t.role, after=[futures[n] for n in t.needs], id=t.id)
                    else:
                        later.append(t)
                pending = later
            wait(list(futures.values()))
            for f in futures.values():
                exc = f.exception() if not f.cancelled() else None
                if isinstance(exc, KeyboardInterrupt):  # `cfn stop` (StopRequested) seen by the feed
                    raise exc
            self._stop_feed(wait=True)
        except KeyboardInterrupt:
            result.interrupted = True
            raise
        finally:
            if self._feed is None:
                result.rounds = self.feed_rounds[first:]
            else:  # interrupted: the feed's round ends when the coordinator closes (see _stop_feed)
                self._partial_from = first
            result.seconds = time.perf_counter() - t0
            result.fallbacks = list(self.ctx.fallbacks.values()) if self.ctx is not None else []
        for figures in self.pm.hook.cfn_report(ctx=self.ctx):
            if figures:
                result.plugin_figures.update(figures)
        return result

    def _stop_feed(self, wait: bool) -> None:
        """End the feed's round (after its tasks when ``wait``): the caller's thread owns the context again."""
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close(wait)
            if self._partial_from is not None and self.partial is not None:
                self.partial.rounds = self.feed_rounds[self._partial_from :]
                self._partial_from = None
            if feed.error is not None and not isinstance(feed.error, Exception):
                raise feed.error

    # ------------------------------------------------------------------ rounds

    def run(self, tasks: Iterable[Any] | None = None, *, rounds: int | None = None) -> CoordinationResult:
        """Run ``rounds`` (default ``[workload] rounds``) coordinations and return the figures.

        :param tasks: payloads (any JSON value) or :class:`~cfn_core.messages.Task` objects for
            every round; default: ``[workload] tasks`` payloads of ``payload_bytes``.

        Outside a ``with`` block the call opens the session and closes it again (no
        agent or run directory outlives it); inside one, agents a plugin keeps (the
        pool) serve the next ``run``.
        """
        if self.ctx is None:
            self.open()
            try:
                return self.run(tasks, rounds=rounds)
            finally:
                self.close()
        self._stop_feed(wait=True)  # submitted tasks finish first; their agents serve the rounds (a pool's)
        ctx = self.ctx
        rounds = rounds or self.config.workload.rounds
        result = self.partial = CoordinationResult(
            plugins=self.config.enabled(), bus=ctx.bus.name, topology=self.config.workload.topology
        )
        t0 = time.perf_counter()
        task_list = list(tasks) if tasks is not None else None
        try:
            for number in range(1, rounds + 1):
                result.rounds.append(self.run_round(number, task_list, result))
        except KeyboardInterrupt:
            result.interrupted = True
            raise
        finally:
            result.seconds = time.perf_counter() - t0
            result.fallbacks = list(ctx.fallbacks.values())
            for figures in self.pm.hook.cfn_report(ctx=ctx):
                if figures:
                    result.plugin_figures.update(figures)
        return result

    def _make_tasks(self, number: int, given: list[Any] | None) -> list[Task]:
        w = self.config.workload
        if given is None:
            payload = "x" * w.payload_bytes
            # one task per agent by default; with roles, each role gets its share (by its count)
            per_role = share_out(w.tasks or w.agents, counts(self.config))
            roles = [role for role, n in per_role.items() for _ in range(n)]
            return [Task(id=f"r{number}-t{i:06d}", payload=payload, role=role) for i, role in enumerate(roles)]
        tasks = [
            t
            if isinstance(t, Task) and number == 1
            else Task(
                id=f"r{number}-t{i:06d}", payload=getattr(t, "payload", t), role=t.role if isinstance(t, Task) else None
            )
            for i, t in enumerate(given)
        ]
        seen: set[str] = set()
        fallback_role = default_role(self.config)
        for i, t in enumerate(tasks):
            if t.id in seen:  # results are keyed by task id: a duplicate would silently vanish
                raise ConfigError(f"task id {t.id!r} appears more than once in the tasks given to Coordinator.run")
            seen.add(t.id)
            _check_task(t)
            if t.role is None:  # filled in here, so that every assign hook sees the role it runs under
                tasks[i] = t = attrs.evolve(t, role=fallback_role)
            else:  # refused before any agent starts, with the roles there are
                check_role(self.config, t.role, f"task {t.id!r}")
            try:  # found now, not as a TypeError half way through sending
                orjson.dumps(t.payload)
            except TypeError as exc:
                raise ConfigError(f"task {t.id}: payload is not JSON: {exc}") from None
        return tasks

    @contextmanager
    def _phase(self, r: _Round, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            r.result.phases[name] += time.perf_counter() - t0

    def _report(self, phase: str, done: int, total: int) -> None:
        if phase == "spawn" and done == 0 and self.ctx is not None:
            # from here until the next phase, every launch and ready message is shown as it happens
            c = self.ctx.counters
            self._spawn_window = (total, c["launched"], c["ready"], time.monotonic())
        elif phase != "spawn":
            self._spawn_window = None
        if self.progress is not None:
            self.progress(phase, done, total)

    def _spawn_progress(self) -> None:
        """An agent was launched or became ready: report ``started`` and ``spawn`` (ready) counts.

        The progress callback gets ``("started", launched, total)`` then ``("spawn", ready,
        total)``; ``total`` is 0 while a plugin pre-spawns before any round (the pool).
        """
        if self.progress is None or self._spawn_window is None or self.ctx is None:
            return
        total, launched0, ready0, _t0 = self._spawn_window
        c = self.ctx.counters
        self.progress("started", c["launched"] - launched0, total)
        self.progress("spawn", c["ready"] - ready0, total)

    def run_round(self, number: int, tasks: list[Any] | None = None, partial: CoordinationResult | None = None) -> RoundResult:
        """One coordination: acquire agents, distribute, collect, release.

        :param number: the round's place in its ``run`` (``RoundResult.round``, and the
            ``r<number>-`` of default task ids); its messages carry the session-wide
            number (``RoundResult.session_round``).
        """
        ctx = self.ctx
        w = self.config.workload
        tasks = self._make_tasks(number, tasks)
        ctx.rounds_started += 1  # never restarts: what a pooled agent kept of earlier runs stays apart
        r = _Round(ctx.rounds_started, number, tasks)
        res = r.result
        if partial is not None:
            partial.rounds.append(res)  # visible to an interrupt handler while it runs
        ctx._round = r
        ctx.round_state = {}
        ctx.spawn_failures = {}
        t_round = time.perf_counter()
        ctx.events.emit("round_started", round=r.number, tasks=len(tasks), agents=w.agents)
        for task in tasks:
            ctx.events.emit("task_queued", task=task.id, round=r.number)
        self.pm.hook.cfn_coordination_start(ctx=ctx, round=r.number)
        try:
            # 1. spawn (and, for strategies that wait per agent, the ready barrier)
            self._report("spawn", 0, w.agents)
            with self._phase(r, "spawn"):
                agent_ids = list(self.pm.hook.cfn_acquire_agents(ctx=ctx, count=w.agents) or [])
            # 2. ready barrier for agents still starting
            with self._phase(r, "ready"):
                ctx.wait_ready([a for a in agent_ids if ctx.agents[a].state == "starting"], self.config.run.spawn_timeout)
            agent_ids = [a for a in agent_ids if ctx.agents[a].state == "ready"]
            ctx.write_directory()  # before any task: a handler's agent.peers() sees the whole round
            r.agent_ids = agent_ids  # where re-queued tasks go (_requeue_due)
            res.agents = len(agent_ids)
            res.spawn_failures = dict(ctx.spawn_failures)
            # 3. distribute
            self._report("distribute", 0, len(r.order))
            with self._phase(r, "distribute"):
                r.distributing = True
                try:
                    self._distribute(r, agent_ids)
                finally:
                    r.distributing = False
            # 4. execute and collect
            t_exec = time.perf_counter()
            ctx._in_execute = True
            try:
                while not r.done:
                    ctx.pump(_TICK)
                    self._report("collect", len(r.results), len(r.tasks))
            finally:
                ctx._in_execute = False
            res.phases["collect"] += r.collect
            res.phases["execute"] += time.perf_counter() - t_exec - r.collect
            # 5. shutdown (or return to the pool)
            with self._phase(r, "shutdown"):
                self.pm.hook.cfn_release_agents(ctx=ctx, agent_ids=agent_ids)
        except KeyboardInterrupt:
            res.interrupted = True
            if not res.agents:  # interrupted before the ready barrier counted them: those that did start
                res.agents = sum(1 for h in ctx.agents.values() if h.alive and h.ready_at is not None)
            raise
        except CfnError as exc:  # the bus filled, an inbox stayed full...: the round stays in the result
            res.error = str(exc)
            raise
        finally:
            self._account(r, t_round)
            ctx.events.emit(
                "round_finished", round=r.number, seconds=round(res.seconds, 6), done=sum(1 for x in r.results.values() if x.ok),
                failed=sum(1 for x in r.results.values() if not x.ok), retries=res.retries, interrupted=res.interrupted, error=res.error,
            )
            ctx._round = None
            if partial is not None and not res.interrupted and res.error is None:
                partial.rounds.remove(res)  # run() appends the finished round; an interrupted one stays
        self.pm.hook.cfn_coordination_finish(ctx=ctx, result=res)
        return res

    def _distribute(self, r: _Round, agent_ids: list[str]) -> None:
        ctx = self.ctx
        w = self.config.workload
        if not agent_ids:
            for task_id in r.order:
                r.settle(task_id, TaskResult(
                    task=task_id, ok=False, error="no agent could be started", attempts=0, answered=False
                ))
                self.ctx.metrics.task_failures.inc()
                ctx.events.emit("task_failed", task=task_id, round=r.number, agent=None, attempt=0, seconds=None, latency=None, error="no agent could be started")
            return
        # a task goes to an agent of its role: the assign hook chooses among those alone
        groups = by_role(self.config, agent_ids)
        tasks = []
        for task_id in r.order:
            task = r.tasks[task_id]
            if groups.get(task.role):
                tasks.append(task)
            else:  # its role has no ready agent (the others may): it cannot run in this round
                r.settle(task_id, TaskResult(
                    task=task_id, ok=False, error=f"no agent of role {task.role!r} could be started", attempts=0, answered=False
                ))
                self.ctx.metrics.task_failures.inc()
        preassigned: dict[str, str] = {}
        if w.topology == "mesh":
            tasks, preassigned = self._plan_mesh(r, tasks, groups)
        else:
            self._check_peers(r, tasks, agent_ids)
        batch: list[Message] = []
        pending = deque(tasks)
        while pending:
            task = pending[0]
            if task.id in r.results:  # reported not started (ctx.not_started) by the assign hook
                pending.popleft()
                continue
            agent_id = preassigned.get(task.id) or self.pm.hook.cfn_assign(ctx=ctx, task=task, agent_ids=groups[task.role])
            if not agent_id:
                ctx.send(batch)
                batch = []
                ctx.pump(_TICK)  # wait for an agent to become free
                continue
            handle = ctx.agents.get(agent_id)
            if handle is None:  # a plugin bug; a KeyError traceback would not say whose
                raise PluginError(f"cfn_assign returned {agent_id!r} for task {task.id}, which is not an agent of this run")
            pending.popleft()
            now = time.monotonic()
            handle.outstanding[task.id] = now
            handle.info["messages_in"] = handle.info.get("messages_in", 0) + 1
            r.assigned[task.id] = agent_id
            r.sent_at[task.id] = now
            ctx.events.emit("task_assigned", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1)
            batch.append(ctx.factory.make(agent_id, "task", round=r.number, task=task.id, body=task.body()))
        ctx.send(batch)
        self.pm.hook.cfn_flush(ctx=ctx, reason="explicit")

    def _plan_mesh(self, r: _Round, tasks: list[Task], groups: dict[str, list[str]]) -> tuple[list[Task], dict[str, str]]:
        """Give every task its own agent (of its role), then choose each one's peers (deterministic from ``seed``)."""
        ctx = self.ctx
        w = self.config.workload
        number = r.result.round  # the same traffic in every run of a session: same seed, same plan
        assigned = []
        try:
            for task in tasks:
                agent_ids = groups[task.role]
                agent_id = self.pm.hook.cfn_assign(ctx=ctx, task=task, agent_ids=agent_ids)
                if not agent_id or agent_id in assigned:
                    n = sum(1 for t in tasks if t.role == task.role)
                    raise ConfigError(
                        f"mesh round {number}: {n} tasks need {n} distinct agents; only {len(agent_ids)} are ready"
                        + (f" (role {task.role!r})" if self.config.roles else "")
                    )
                assigned.append(agent_id)
                ctx.agents[agent_id].outstanding[task.id] = time.monotonic()  # so assign sees it busy
        finally:  # _distribute marks them outstanding when it sends them; a refusal sends nothing
            for task, agent_id in zip(tasks, assigned):
                ctx.agents[agent_id].outstanding.pop(task.id, None)
        n = len(assigned)
        peers: list[list[str]] = [[] for _ in range(n)]
        expect = [0] * n
        for i, row in enumerate(mesh_peer_indices(n, w.messages_per_agent, w.seed, number)):
            for j in row:
                peers[i].append(assigned[j])
                expect[j] += 1
        depth = self.config.bus.inbox_depth
        if depth and max(expect) + 1 > depth:
            # an agent settles its peer messages only with its task: they would fill its inbox for good
            raise ConfigError(mesh_depth_message(number, max(expect), w.messages_per_agent, depth))
        planned, preassigned = [], {}
        for i, task in enumerate(tasks):
            t = Task(id=task.id, payload=task.payload, peers=tuple(peers[i]), expect=expect[i], role=task.role)
            r.tasks[t.id] = t
            preassigned[t.id] = assigned[i]
            planned.append(t)
        return planned, preassigned

    def _check_peers(self, r: _Round, tasks: list[Task], agent_ids: list[str]) -> None:
        """Refuse, before anything is sent, explicit peers (``Task(peers=..., expect=...)``)
        whose messages could not arrive or whose tasks could never complete."""
        addressed: Counter[str] = Counter()
        ready = set(agent_ids)
        for task in tasks:
            for peer in task.peers:
                if peer not in ready:
                    known = self.ctx.spawn_failures.get(peer)
                    raise ConfigError(
                        f"task {task.id!r}: peer {peer!r} is not an agent of this round"
                        + (f" (it could not be started: {known})" if known else "")
                        + f"; its {len(agent_ids)} agent(s): {_some(agent_ids)}"
                    )
                addressed[peer] += 1
        depth = self.config.bus.inbox_depth
        most = max(addressed.values(), default=0)
        for task in tasks:
            if depth and task.expect + 1 > depth:
                # its peer messages are settled only with the task: they would fill the inbox for good
                raise ConfigError(
                    f"task {task.id!r}: expect = {task.expect} peer messages, but [bus] inbox_depth = {depth} "
                    f"lets an agent hold {depth - 1} besides its task; raise inbox_depth above {task.expect} "
                    "(or 0: unlimited) or expect fewer"
                )
            if task.expect > most:
                raise ConfigError(
                    f"task {task.id!r}: expect = {task.expect} peer messages, but no agent is sent more than "
                    f"{most} in this round (the tasks' peers): it could never complete"
                )
        if depth and most + 1 > depth:
            busiest = addressed.most_common(1)[0][0]
            raise ConfigError(
                f"agent {busiest!r} is sent {most} peer messages in this round, but [bus] inbox_depth = {depth}; "
                f"raise inbox_depth above {most} (or 0: unlimited) or send fewer peer messages"
            )
        sent, expected = sum(addressed.values()), sum(task.expect for task in tasks)
        if sent != expected:
            # a message nobody waits for is counted nowhere; one waited for that is never sent hangs
            raise ConfigError(
                f"the tasks send {sent} peer message(s) but expect {expected} in all: every peer message "
                "must be expected by the task of the agent it is sent to"
            )

    def _account(self, r: _Round, t_round: float) -> None:
        """Delivery figures of the round, counted from what arrived."""
        ctx = self.ctx
        res = r.result
        res.results = r.results
        res.seconds = time.perf_counter() - t_round
        expect_total = sum(t.expect for t in r.tasks.values())
        # a cancelled or skipped task was not meant to answer any more (submit, [[tasks]])
        withdrawn = sum(1 for x in r.results.values() if x.cancelled or x.skipped)
        res.planned = 2 * (len(r.tasks) - withdrawn) + expect_total
        from_agents = [x for x in r.results.values() if x.answered and not x.cancelled]
        res.delivered = 2 * len(from_agents) + sum(x.peers_received for x in from_agents)
        res.messages_sent = len(r.tasks) + len(from_agents) + r.peers_sent
        # the bus counts the whole run; the round gets what is new since the last round
        dead_total = ctx.bus.dead_letter_count()
        res.dead_lettered = max(0, dead_total - ctx.counters.get("dead_seen", 0))
        res.latency_p50 = percentile(r.latencies, 50)
        res.latency_p99 = percentile(r.latencies, 99)
        m = ctx.metrics
        m.coordination_seconds.observe(res.seconds)
        for phase in PHASES:
            m.phase_seconds.labels(phase=phase).observe(res.phases.get(phase, 0.0))
        m.delivery_rate.set(res.delivery_rate)
        if res.dead_lettered:
            m.messages_dead_lettered.inc(res.dead_lettered)
        ctx.counters["dead_seen"] = max(dead_total, ctx.counters.get("dead_seen", 0))
        for latency in r.latencies:
            m.latency_seconds.observe(latency)


def mesh_peer_indices(n: int, messages: int, seed: int, number: int) -> list[list[int]]:
    """The mesh plan of round ``number``: for each of ``n`` tasks, the indices of its peers.

    Deterministic from ``seed``; no task is its own peer.  Used to plan a round and,
    before anything starts, to check the configured workload's inboxes can hold it.
    """
    rng = random.Random(seed * 1_000_003 + number)
    rows: list[list[int]] = [[] for _ in range(n)]
    if n > 1:
        for i in range(n):
            for _ in range(messages):
                j = rng.randrange(n - 1)
                rows[i].append(j + (j >= i))
    return rows


def mesh_depth_message(number: int, fan_in: int, messages: int, depth: int) -> str:
    return (
        f"mesh round {number}: an agent must hold {fan_in} peer messages at once "
        f"([workload] messages_per_agent = {messages}) but [bus] inbox_depth = {depth}; "
        f"raise inbox_depth above {fan_in} (or 0: unlimited) or send fewer peer messages"
    )
