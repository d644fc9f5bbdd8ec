"""The coordinator side's state and the API its plugins use: ``ctx`` of every coordinator hook.

:class:`CoordinatorContext` holds the session (config, plugin manager, bus, agents,
metrics, event log) and offers plugins what they may do: start agents
(:meth:`~CoordinatorContext.launch`, :meth:`~CoordinatorContext.wait_ready`), stop or
kill them, send messages, and run the event loop one step
(:meth:`~CoordinatorContext.pump`).  What the loop then does with what it sees is
elsewhere: records in the inbox go to :class:`cfn_core.intake.ResultIntake`, agent
exits and the task watchdog to :class:`cfn_core.supervision.Supervisor`, and the
round's own bookkeeping is :class:`cfn_core.round.Round`.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterable

from attrs import define, field

from .errors import CfnError
from .events import EventLog, open_event_log
from .figures import AgentFigures
from .intake import ResultIntake
from .live import Live
from .messages import COORDINATOR_ID, Message, MessageFactory, Task, TaskResult, check_agent_id
from .process import interrupts_deferred, pidfd_open
from .report import NOT_STARTED
from .roles import directory_document
from .supervision import Supervisor
from .usage import Usage

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .round import Round

log = logging.getLogger("cfn")

#: seconds between the event loop's periodic checks (watchdog, re-queues, snapshot, cfn_tick)
TICK = 0.05
#: free space on the bus below which an agent's death at start is blamed on a full bus
_LOW_SPACE_BYTES = 64 * 1024


@define(eq=False)
class AgentHandle:
    """One agent process as the coordinator sees it.

    ``state`` is ``starting`` (launched), ``ready`` (answered), ``stopping``
    (asked to exit) or ``exited``.  ``outstanding`` maps task ids sent to it
    and not yet answered to the monotonic time they were sent, oldest first.

    A *remote* agent (started on another machine by a transport plugin such as
    cfn-redis, or hosted in a host process) has ``remote`` set, an object with
    ``kill(handle, reason)`` and optionally ``stop(handles)`` (ask them all to exit,
    e.g. one order per host instead of a stop record per agent; without it each gets
    a ``stop`` record), and no pidfd (``pid`` may be None until known); its plugin
    reports its end with :meth:`CoordinatorContext.reap`.
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
        self._directory: dict[str, dict] | None = None  # what write_directory last wrote
        self._directory_warned = False
        self._directory_seen: tuple[int, int, int] | None = None  # (launched, ready, exits) at the last write
        self._directory_due = 0.0  # the periodic write waits until then (write_directory)
        self.exits = 0  # agent exits handled (the directory's change check)
        #: agent id -> its directory entry (role, host), kept between writes (roles.directory_document)
        self.directory_entries: dict[str, dict] = {}
        self._routes: dict[str, str] = {}
        self._selector = selectors.DefaultSelector()
        self._round: Round | None = None  # set and cleared by cfn_core.round alone
        self._next_tick = 0.0
        #: called (no arguments) whenever an agent is launched or becomes ready: live spawn progress
        self.on_spawn_progress: Callable[[], None] | None = None
        #: the event log (docs/EVENTS.md); one that writes nothing unless the Coordinator got ``events``
        self.events: EventLog = open_event_log(None)
        self.live = Live()  # the snapshot `cfn top` reads and the stop request of `cfn stop`
        #: what the session's tasks spent (an accounting plugin adds to it, a budget reads it)
        self.usage = Usage()
        self.intake = ResultIntake(self)  # the inbox: ready, results, status (cfn_core.intake)
        self.supervisor = Supervisor(self)  # exits, recovery, the watchdog (cfn_core.supervision)

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
        self.events.emit("agent_started", agent=agent_id, pid=handle.pid, incarnation=handle.incarnation, host=handle.info.get("host"))
        self.metrics.agents.inc()
        self.counters["launched"] += 1
        if self.on_spawn_progress is not None:
            self.on_spawn_progress()
        if handle.pidfd is None:
            if handle.remote is None:
                self.supervisor.on_exit(handle)
        else:
            self._selector.register(handle.pidfd, selectors.EVENT_READ, handle)
        early = self.intake.early_ready.pop(agent_id, None)
        if early is not None and handle.alive:
            self.intake.on_ready(early, handle, time.monotonic())
        return handle

    def wait_ready(self, agent_ids: Iterable[str], timeout: float) -> SpawnReport:
        """Pump the bus until every agent in ``agent_ids`` is ready or gone.

        Agents still starting after ``timeout`` seconds are killed and reported.
        """
        ids = list(agent_ids)
        deadline = time.monotonic() + timeout
        agents = self.agents

        def starting(among: list[str]) -> list[str]:
            return [a for a in among if a in agents and agents[a].state == "starting"]

        pending = starting(ids)
        while True:
            # the still-starting ones as a stack: the top is looked at after every pump and
            # popped once it is not starting any more, so each agent is checked about once
            # (all of them on every pump were 11% of a cold 10,000-agent run's samples, the
            # still-starting ones 10% after that); when none is left, all of them once more,
            # for one that became ready, died and is being relaunched meanwhile
            while pending and not (pending[-1] in agents and agents[pending[-1]].state == "starting"):
                pending.pop()
            if not pending:
                pending = starting(ids)
                if not pending:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = starting(ids)
                for agent_id in pending:
                    self.spawn_failures[agent_id] = f"not ready within {timeout:g}s"
                    self.kill(self.agents[agent_id], f"not ready within {timeout:g}s")
                self._await_exit([self.agents[a] for a in pending], 1.0)
                break
            self.pump(min(remaining, TICK))
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
        by_remote: dict[int, tuple[Any, list[AgentHandle]]] = {}  # remotes that stop many agents with one order
        for handle in handles:
            if handle.state != "stopping":
                handle.state = "stopping"
                if getattr(handle.remote, "stop", None) is not None:
                    by_remote.setdefault(id(handle.remote), (handle.remote, []))[1].append(handle)
                else:
                    stops.append(self.factory.make(handle.id, "stop"))
        try:
            self.send(stops)
            for remote, group in by_remote.values():
                remote.stop(group)
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
            self.pump(TICK)

    def reap(self, handle: AgentHandle, exit_code: int | None = None) -> None:
        """A plugin learned that a remote agent ended: handle it like a death seen through a pidfd."""
        if handle.alive:
            if exit_code is not None:
                handle.exit_code = exit_code
            self.supervisor.on_exit(handle)

    @property
    def current_round(self) -> Round | None:
        """The round in progress (tasks, results, attempts), or None between rounds.  Read only:
        :func:`cfn_core.round.begin_round` and :func:`~cfn_core.round.finish_round` change it."""
        return self._round

    # ------------------------------------------------------------------ the event loop

    def listen(self) -> None:
        """Start the event loop's watch of the coordinator's own doorbell (when the session opens)."""
        self.bus.listen(COORDINATOR_ID)
        self._selector.register(self.bus.wake_fd(COORDINATOR_ID), selectors.EVENT_READ, None)

    def watch(self, fd: int, waker: Any) -> None:
        """Have :meth:`pump` call ``waker.on_wake()`` when ``fd`` is readable (the feed's submissions)."""
        self._selector.register(fd, selectors.EVENT_READ, waker)

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    def close_loop(self) -> None:
        """The session closed: release the event loop's selector."""
        self._selector.close()

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
        self.intake.drain()
        if died:
            self.intake.drain()  # a result written just before the death is read first
            for handle in died:
                self.supervisor.on_exit(handle)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            self.write_directory(now)  # agents ready or gone since the last tick
            self.supervisor.watchdog(now)
            self.intake.requeue_due(now)
            self.live.tick(self, now)  # event log flush, messages per interval, snapshot, stop request
            self.hook.cfn_tick(ctx=self, now=now)

    def write_directory(self, now: float | None = None) -> None:
        """Publish the run's agents (bus state ``directory``) when the set changed since the last write.

        The document is :func:`cfn_core.roles.directory_document`'s (every reachable agent
        with its role).  Agents read it lazily (``agent.peers()``, ``agent.send``).

        The set changes only when an agent is launched, becomes ready or exits, so those
        three counts tell whether to build the document at all.  ``now`` (the event loop's
        periodic call) also spaces the writes out: the next one waits twenty times as long
        as this one took, so that while thousands of agents start, rewriting their directory
        on every tick cannot take more than about a twentieth of the coordinator's time (it
        was 14% of a cold 10,000-agent run).  Called without ``now`` it writes at once (a
        round's agents are published before its first task).
        """
        if self.bus is None:
            return
        if now is not None and now < self._directory_due:
            return
        seen = (self.counters["launched"], self.counters["ready"], self.exits)
        if seen == self._directory_seen:
            return
        t0 = time.monotonic()
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
        self._directory_seen = seen
        done = time.monotonic()
        self._directory_due = done + 20 * (done - t0)
