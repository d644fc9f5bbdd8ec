"""One coordination: bus, spawn, ready barrier, distribute, collect, shutdown.

Read :meth:`Coordinator.run_round` top to bottom for the data flow.  Every
replaceable step is a hook call (see :mod:`cfn_core.hookspecs`); the bookkeeping
that keeps the guarantees lives in the modules each step names:

* :mod:`cfn_core.context`: the session's state and the API plugins get as ``ctx``,
  with the event loop (:meth:`~cfn_core.context.CoordinatorContext.pump`); every
  agent is watched through a pidfd, so a death is noticed at once;
* :mod:`cfn_core.round`: a round's tasks from queued to accounted (numbered across
  the whole session, so nothing of an earlier ``run`` is taken for a later one's),
  the distribution and the mesh plan;
* :mod:`cfn_core.intake`: what arrives in the coordinator's inbox; results are
  checked, de-duplicated by task id and accepted only from the agent the task was
  sent to, in the round it was sent in; the failure policy re-queues with backoff;
* :mod:`cfn_core.supervision`: an agent that dies (or is killed for exceeding
  ``[workload] timeout``) with work outstanding is relaunched under the same id, and
  the new incarnation re-reads the messages its predecessor had not settled; the
  task that was running is charged an attempt, and after ``max_attempts`` it is
  reported failed and the agent told to skip it.

The session around the rounds (open, close), the feed's entry points (``submit``,
``map``, ``as_completed``, ``cancel``) and ``run`` are here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import attrs
import orjson

from .config import Config, check_coordination, load_config
from .context import TICK, AgentHandle, CoordinatorContext, SpawnReport
from .errors import CfnError, ConfigError
from .events import open_event_log
from .messages import Task, check_agent_id
from .metrics import Metrics
from .plugins import make_plugin_manager
from .process import Janitor, ensure_fds_for_agents, interrupts_deferred
from .report import CoordinationResult, RoundResult
from .roles import check_role, counts, default_role, process_agents, roles_of, share_out
from .round import Round, begin_round, check_task, distribute, finish_round, join_agents
from .intake import result_problem

__all__ = ["AgentHandle", "Coordinator", "CoordinatorContext", "SpawnReport", "result_problem"]


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
        check_coordination(self.config)  # what no single setting shows: found before anything starts
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
            ctx.listen()
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
                        ctx._round = None  # closing: nothing is collected any more
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
                ctx.close_loop()
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
            check_task(t)
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
    def _phase(self, r: Round, name: str):
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
        r = begin_round(ctx, number, tasks)
        res = r.result
        if partial is not None:
            partial.rounds.append(res)  # visible to an interrupt handler while it runs
        t_round = time.perf_counter()
        try:
            # 1. spawn (and, for strategies that wait per agent, the ready barrier)
            self._report("spawn", 0, w.agents)
            with self._phase(r, "spawn"):
                agent_ids = list(self.pm.hook.cfn_acquire_agents(ctx=ctx, count=w.agents) or [])
            # 2. ready barrier for agents still starting
            with self._phase(r, "ready"):
                ctx.wait_ready([a for a in agent_ids if ctx.agents[a].state == "starting"], self.config.run.spawn_timeout)
            agent_ids = join_agents(ctx, r, agent_ids)
            # 3. distribute
            self._report("distribute", 0, len(r.order))
            with self._phase(r, "distribute"):
                r.distributing = True
                try:
                    distribute(ctx, r, agent_ids)
                finally:
                    r.distributing = False
            # 4. execute and collect
            t_exec = time.perf_counter()
            r.executing = True
            try:
                while not r.done:
                    ctx.pump(TICK)
                    self._report("collect", len(r.results), len(r.tasks))
            finally:
                r.executing = False
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
            finish_round(ctx, r, t_round)
            if partial is not None and not res.interrupted and res.error is None:
                partial.rounds.remove(res)  # run() appends the finished round; an interrupted one stays
        self.pm.hook.cfn_coordination_finish(ctx=ctx, result=res)
        return res

