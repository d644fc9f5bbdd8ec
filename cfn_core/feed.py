"""The feed: tasks submitted one at a time, results as :class:`concurrent.futures.Future` objects.

``Coordinator.submit`` hands a task to the *feed thread*, which owns the coordination while
the feed runs: every bus call, every agent handle and every hook call happens in that one
thread (what ``Coordinator.run`` does in the caller's thread), so nothing of the kernel
needs a lock.  The caller's threads talk to it through a queue of commands and a wake-up
pipe registered in the pump's selector (like ``ProcessPoolExecutor``'s management thread):
a submission wakes the pump at once, whatever it waits for.

The feed runs one *open-ended round*: agents are acquired once (``cfn_acquire_agents``:
the pool's idle agents), tasks join it as they are submitted, and it ends when the
coordinator closes (or ``run`` needs the agents; it waits for submitted work first), when
the agents are released (the pool keeps them).  Between submissions the agents wait idle in
the round, so a later ``submit`` goes to a warm agent.

Dispatch keeps up to ``[workload] prefetch`` tasks in flight per agent: a pooling plugin's
``cfn_assign`` asks ``ctx.has_room``; with the baseline's round robin the feed holds a
role to ``prefetch`` times its agents in flight.  Every pass sends what it assigned as one
batch.  ``cfn_assign`` returning False ("not now", a pool with every agent busy or a rate
limit) stops the pass for that role until the next result, submission or tick.

Task graphs: a task submitted with ``after=[futures]`` is held until those finished, then
sent with the payload ``{"payload": <its payload>, "after": {task id: result value}}``.  A
task it waits for that fails (or is cancelled) fails it without running (``skipped``).

Cancellation: ``Future.cancel()`` works while the task is queued here; ``Coordinator.cancel``
also cancels a task an agent holds: the agent is sent a ``cancel`` record (it drops a queued
task, kills a running command's process group, makes a Python handler's next agent call
raise :class:`~cfn_core.errors.Cancelled`); an agent that has not answered after ``[workload]
cancel_grace`` seconds is killed and replaced.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Any, Iterable

from .context import TICK
from .errors import Cancelled, CfnError, ConfigError, PluginError, TaskFailed
from .messages import Task, TaskResult, check_agent_id

log = logging.getLogger("cfn")

#: seconds between two looks at the requests `cfn cancel` writes
REQUEST_SECONDS = 0.25
#: the directory under the run directory's ``state/`` that holds `cfn cancel`'s requests
CANCEL_DIR = "cancel"


class TaskFuture(Future):
    """The :class:`concurrent.futures.Future` of one submitted task; ``task_id`` names it.

    ``result()`` is the handler's return value; it raises
    :class:`~cfn_core.errors.TaskFailed` when the task failed (or was skipped because a task
    it needed failed) and :class:`~cfn_core.errors.Cancelled` (a
    ``concurrent.futures.CancelledError``) when it was cancelled while an agent held it.
    """

    def __init__(self, feed: "Feed", task_id: str):
        super().__init__()
        self.task_id = task_id
        self._feed = feed

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:  # the feed thread forgets it (and fails what waits for it) at once
            self._feed.untaken.pop(self.task_id, None)
            self._feed.put(("forget", self.task_id))
        return cancelled

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)  # raises when it failed: taken all the same
        self._feed.untaken.pop(self.task_id, None)
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        self._feed.untaken.pop(self.task_id, None)
        return error

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} {self._state.lower()}>"


class Feed:
    """The feed thread of one open :class:`~cfn_core.coordinator.Coordinator` (see the module)."""

    def __init__(self, coord):
        self.coord = coord
        self.ctx = coord.ctx
        self.config = coord.config
        self._commands: deque = deque()  # appended by any thread, popped by the feed thread
        self._lock = threading.Lock()  # submission vs. close: nothing is queued after the last drain
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._ids = itertools.count(1)
        self.futures: dict[str, TaskFuture] = {}  # every task submitted and not finished
        # every task submitted whose outcome the caller has not taken yet (result(), exception(),
        # or yielded by Coordinator.as_completed()): the default of Coordinator.as_completed
        self.untaken: dict[str, TaskFuture] = {}
        self.known: set[str] = set()  # every task id this feed was given (unique per session)
        self.closing = False  # no more submissions
        self.draining = False  # end once nothing is unfinished
        self.error: BaseException | None = None  # what stopped the feed thread
        self.round = None
        self.agents: list[str] = []
        self.groups: dict[str, list[str]] = {}
        self.queues: dict[str, deque] = {}  # role -> tasks ready to be sent, in submission order
        self.in_flight: dict[str, int] = {}  # role -> tasks sent and not answered
        self.waiting: dict[str, set[str]] = {}  # task id -> ids of the tasks it waits for
        self.dependants: dict[str, list[str]] = {}  # task id -> tasks waiting for it
        self.held: dict[str, tuple[Task, str | None]] = {}  # tasks waiting for others: (task, to)
        self.to: dict[str, str] = {}  # task id -> the agent it must run on (submit(to=...))
        self.cancelling: dict[str, tuple[str, float]] = {}  # task id -> (agent, when the agent was asked)
        self.deadlines: dict[str, float] = {}  # task id -> seconds it may run once sent (submit(timeout=...))
        self._cascade: deque = deque()  # (task id, result) whose dependants are still to be released
        self._cascading = False
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0, "skipped": 0}
        self.ready = threading.Event()  # the round has its agents (or failed to get them)
        self._next_request_check = 0.0
        self.thread = threading.Thread(target=self._main, name="cfn-feed", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self.thread.start()

    def on_wake(self) -> None:
        """The pump saw the wake-up pipe: empty it (the commands are taken after the pump)."""
        self._woken = False
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def put(self, command: tuple) -> None:
        self._commands.append(command)
        if not self._woken:  # one byte per wake-up, not per submission
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    def submit(self, payload: Any, role: str | None, to: str | None, after: Iterable[Any], task_id: str | None) -> TaskFuture:
        after_ids = []
        for f in after:
            if not isinstance(f, TaskFuture):
                raise ConfigError(f"submit(after=...): {f!r} is not a future returned by Coordinator.submit")
            if f._feed is not self:
                raise ConfigError(
                    f"submit(after=...): the future of task {f.task_id} belongs to another coordinator "
                    "(or an earlier session of this one): a task can only wait for tasks of its own coordinator"
                )
            after_ids.append(f.task_id)
        with self._lock:
            if self.closing or self.error is not None:
                raise CfnError("submit: the coordinator is closed" + (f" (its feed stopped: {self.error})" if self.error else ""))
            if task_id is None:
                task_id = f"t{next(self._ids):06d}"
                while task_id in self.known:
                    task_id = f"t{next(self._ids):06d}"
            elif not isinstance(task_id, str) or not task_id:
                raise ConfigError(f"submit(id={task_id!r}): a task id is a non-empty string")
            elif task_id in self.known:
                raise ConfigError(f"submit(id={task_id!r}): this coordinator already has a task with that id")
            self.known.add(task_id)
            future = TaskFuture(self, task_id)
            self.futures[task_id] = future
            self.untaken[task_id] = future
            self.put(("submit", task_id, payload, role, to, after_ids))
        return future

    def unfinished(self) -> list[TaskFuture]:
        """The futures of the submitted tasks not finished yet (from any thread)."""
        while True:
            try:
                return list(self.futures.values())
            except RuntimeError:  # the feed thread settled one meanwhile: take the copy again
                continue

    def not_taken(self) -> list[TaskFuture]:
        """The futures of the submitted tasks whose outcome was not taken yet (from any thread)."""
        while True:
            try:
                return list(self.untaken.values())
            except RuntimeError:  # another thread took one meanwhile: take the copy again
                continue

    def cancel(self, task_id: str, timeout: float = 60.0) -> bool:
        """Cancel ``task_id`` wherever it is; True when it was cancelled (False: it had finished)."""
        if task_id not in self.known:
            raise CfnError(f"cancel: no task {task_id!r} was submitted to this coordinator")
        future = self.futures.get(task_id)
        if future is None or future.done():
            return False
        if future.cancel():  # still queued here
            return True
        answer: Future = Future()
        self.put(("cancel", task_id, answer))
        return answer.result(timeout)

    def close(self, wait: bool = True) -> None:
        """No more submissions; end the round (after its tasks when ``wait``); join the thread."""
        with self._lock:
            self.closing = True
        self.put(("drain",) if wait else ("stop",))
        self.thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ the feed thread

    def _main(self) -> None:
        ctx = self.ctx
        try:
            ctx.watch(self._wake_r, self)
            try:
                self._begin()
                self.ready.set()
                while True:
                    self._take_commands()
                    if self.draining and not self.futures and not self._commands:
                        break
                    self._dispatch()
                    ctx.pump(TICK)
                    self._check_timers()
                    now = time.monotonic()
                    if now >= self._next_request_check:
                        self._next_request_check = now + REQUEST_SECONDS
                        self._cancel_requests()
            finally:
                self.ready.set()
                try:
                    self._end()
                finally:
                    ctx.unwatch(self._wake_r)
        except BaseException as exc:  # the bus failed, a plugin broke: every open future learns why
            self.error = exc
            log.error("cfn: the feed stopped: %s", exc)
            with self._lock:
                self.closing = True
            self._take_commands()
            for task_id, future in list(self.futures.items()):
                if not future.done():
                    # `cfn stop` (StopRequested, a KeyboardInterrupt): result() raises it in the
                    # caller's thread, which then stops as `cfn run` does on SIGTERM
                    future.set_exception(exc if isinstance(exc, KeyboardInterrupt) else CfnError(f"task {task_id}: the coordinator's feed stopped: {exc}"))
            self.futures.clear()

    def _begin(self) -> None:
        from .roles import by_role, default_role
        from .round import begin_round, join_agents

        coord, ctx = self.coord, self.ctx
        w = self.config.workload
        r = self.round = begin_round(ctx, None, [])
        r.on_settle = self._settled
        self.t0 = time.perf_counter()
        agent_ids = list(coord.pm.hook.cfn_acquire_agents(ctx=ctx, count=w.agents) or [])
        ctx.wait_ready([a for a in agent_ids if ctx.agents[a].state == "starting"], self.config.run.spawn_timeout)
        self.agents = join_agents(ctx, r, agent_ids)  # also where the failure policy's re-queued tasks go
        self.groups = by_role(self.config, self.agents)
        r.distributing = True  # an agent that dies is replaced: the feed goes on with all of them
        self.default_role = default_role(self.config)
        r.executing = True

    def _end(self) -> None:
        from .round import finish_round

        ctx, r = self.ctx, self.round
        if r is None:
            return
        try:  # a `cfn cancel` waiting now gets an answer, not "the run ended before it answered"
            self._cancel_requests(ending=True)
        except Exception as exc:  # answering must not keep the round from ending
            log.warning("could not answer the last cfn cancel requests: %s", exc)
        r.executing = False
        r.distributing = False
        try:
            if self.agents:
                self.coord.pm.hook.cfn_release_agents(ctx=ctx, agent_ids=self.agents)
        finally:
            r.result.tasks = len(r.tasks)
            finish_round(ctx, r, self.t0)
            self.coord.feed_rounds.append(r.result)
        self.coord.pm.hook.cfn_coordination_finish(ctx=ctx, result=r.result)

    def _take_commands(self) -> None:
        commands = self._commands
        while commands:
            command = commands.popleft()
            kind = command[0]
            if kind == "submit":
                self._accept(*command[1:])
            elif kind == "forget":  # Future.cancel() of a queued task
                self._cancelled_here(command[1])
            elif kind == "cancel":
                self._cancel_running(command[1], command[2])
            elif kind == "deadline":
                if command[1] not in self.round.results:
                    self.deadlines[command[1]] = command[2]
            elif kind == "drain":
                self.draining = True
            elif kind == "stop":  # closing on an error or an interrupt: what is unfinished ends now
                self.draining = True
                self.round.result.interrupted = True
                for task_id in list(self.futures):
                    self._finish_unsent(task_id, TaskResult(
                        task=task_id, ok=False, error="the coordinator closed before the task finished",
                        agent=self.round.assigned.get(task_id), attempts=0, answered=False,
                    ))

    def _accept(self, task_id: str, payload: Any, role: str | None, to: str | None, after: list[str]) -> None:
        """A submission, in the feed thread: check it, hold it for its dependencies or queue it."""
        ctx, r = self.ctx, self.round
        if task_id not in self.futures:  # cancelled and forgotten before the thread saw it
            return
        self.counts["submitted"] += 1
        ctx.events.emit("task_queued", task=task_id, round=r.number)
        if to is not None:
            try:
                check_agent_id(to)
                if to not in self.agents:
                    raise ConfigError(f"submit(to={to!r}): no such agent in this run; its agents: {', '.join(self.agents[:6]) or 'none'}")
            except CfnError as exc:
                self._finish_unsent(task_id, TaskResult(task=task_id, ok=False, error=str(exc), attempts=0, answered=False))
                return
            if role is None:
                from .roles import role_of

                role = role_of(self.config, to).name
            self.to[task_id] = to
        task = Task(id=task_id, payload=payload, role=role or self.default_role)
        r.tasks[task_id] = task
        r.order.append(task_id)
        if not after:
            queue = self.queues.get(task.role)
            if queue is None:
                queue = self.queues[task.role] = deque()
            queue.append(task)
            return
        pending = set()
        for dep in after:
            dep_result = r.results.get(dep)
            if dep_result is None:
                pending.add(dep)
            elif not dep_result.ok:
                self._skip(task.id, dep, dep_result)
                return
        if pending:
            self.waiting[task.id] = pending
            for dep in pending:
                self.dependants.setdefault(dep, []).append(task.id)
            self.held[task.id] = (task, after)
        else:
            self._queue(self._with_inputs(task, after))

    def _with_inputs(self, task: Task, after: list[str]) -> Task:
        r = self.round
        inputs = {dep: r.results[dep].value for dep in after}
        t = Task(id=task.id, payload={"payload": task.payload, "after": inputs}, role=task.role)
        r.tasks[t.id] = t
        return t

    def _queue(self, task: Task) -> None:
        self.queues.setdefault(task.role, deque()).append(task)

    def _dispatch(self) -> None:
        """Send every queued task an agent has room for, in one batch."""
        ctx, r = self.ctx, self.round
        hook = ctx.hook
        prefetch = self.config.workload.prefetch
        batch = []
        now = time.monotonic()
        factory, emit, number = ctx.factory, ctx.events.emit, r.number
        for role, queue in self.queues.items():
            if not queue:
                continue
            agent_ids = self.groups.get(role)
            if not agent_ids:
                while queue:
                    task = queue.popleft()
                    self._finish_unsent(task.id, TaskResult(task=task.id, ok=False, error=f"no agent of role {role!r} could be started", attempts=0, answered=False))
                continue
            limit = prefetch * len(agent_ids)
            flying = self.in_flight.get(role, 0)
            futures, tos = self.futures, self.to
            results = r.results
            while queue:
                task = queue[0]
                if task.id in results:  # settled unsent: a limit reported it not started (a budget)
                    queue.popleft()
                    continue
                future = futures.get(task.id)
                if future is None:  # Future.cancel() while it was queued
                    queue.popleft()
                    self._cancelled_here(task.id)
                    continue
                to = tos.get(task.id) if tos else None
                if to is not None:
                    agent_id = to
                else:
                    if flying >= limit:
                        break
                    agent_id = hook.cfn_assign(ctx=ctx, task=task, agent_ids=agent_ids)
                    if not agent_id:
                        break  # "not now": asked again after the next pump
                handle = ctx.agents.get(agent_id)
                if handle is None:
                    raise PluginError(f"cfn_assign returned {agent_id!r} for task {task.id}, which is not an agent of this run")
                if handle.state == "exited":  # died idle (the round robin still names it): a new incarnation
                    handle = ctx.launch(agent_id)
                if not future.set_running_or_notify_cancel():  # cancelled meanwhile
                    queue.popleft()
                    self._cancelled_here(task.id)
                    continue
                queue.popleft()
                flying += 1
                handle.outstanding[task.id] = now
                handle.info["messages_in"] = handle.info.get("messages_in", 0) + 1
                r.assigned[task.id] = agent_id
                r.sent_at[task.id] = now
                emit("task_assigned", task=task.id, round=number, agent=agent_id, attempt=r.attempts[task.id] + 1)
                batch.append(factory.make(agent_id, "task", round=number, task=task.id, body=task.body()))
            self.in_flight[role] = flying
        if batch:
            ctx.send(batch)
            hook.cfn_flush(ctx=ctx, reason="explicit")

    # ------------------------------------------------------------------ results

    def _settled(self, task_id: str, result: TaskResult) -> None:
        """``Round.settle`` called back: resolve the future, release what waited for it."""
        r = self.round
        if task_id in r.assigned:
            role = r.tasks[task_id].role
            self.in_flight[role] = self.in_flight.get(role, 1) - 1
        self.cancelling.pop(task_id, None)
        future = self.futures.pop(task_id, None)
        if result.cancelled:
            self.counts["cancelled"] += 1
        elif result.skipped:
            self.counts["skipped"] += 1
        elif result.ok:
            self.counts["done"] += 1
        else:
            self.counts["failed"] += 1
        if future is not None:
            try:  # no done() first: it takes the future's lock too, and set_result refuses a done one
                if result.ok:
                    future.set_result(result.value)
                elif result.cancelled:
                    future.set_exception(Cancelled(f"task {task_id} was cancelled"))
                else:
                    future.set_exception(TaskFailed(task_id, result.error, result.agent, skipped=result.skipped))
            except InvalidStateError:  # Future.cancel() won the race: it stays cancelled
                pass
        if task_id in self.dependants:
            # released in a loop, not by recursion: a failure at the head of a chain of
            # thousands of tasks skips them all without reaching the recursion limit
            self._cascade.append((task_id, result))
            if not self._cascading:
                self._cascading = True
                try:
                    while self._cascade:
                        self._release(*self._cascade.popleft())
                finally:
                    self._cascading = False

    def _release(self, task_id: str, result: TaskResult) -> None:
        """What waited for ``task_id``: queued when its last dependency succeeded, else skipped."""
        for dependant in self.dependants.pop(task_id, ()):
            pending = self.waiting.get(dependant)
            if pending is None:
                continue
            if not result.ok:
                self._skip(dependant, task_id, result)
                continue
            pending.discard(task_id)
            if not pending:
                del self.waiting[dependant]
                task, after = self.held.pop(dependant)
                self._queue(self._with_inputs(task, after))

    def _skip(self, task_id: str, dep: str, dep_result: TaskResult) -> None:
        """A task ``task_id`` waits for failed or was cancelled: it fails without running."""
        self.waiting.pop(task_id, None)
        self.held.pop(task_id, None)
        how = "was cancelled" if dep_result.cancelled else "was skipped" if dep_result.skipped else "failed"
        reason = f"task {dep} it needs {how}" + (f": {dep_result.error}" if dep_result.error and not dep_result.cancelled else "")
        self.ctx.events.emit("task_skipped", task=task_id, round=self.round.number, after=dep, reason=reason)
        self._finish_unsent(task_id, TaskResult(task=task_id, ok=False, error=reason, attempts=0, answered=False, skipped=True))

    def _finish_unsent(self, task_id: str, result: TaskResult) -> None:
        r = self.round
        if task_id in r.results:
            return
        if not result.skipped and not result.cancelled:
            self.ctx.metrics.task_failures.inc()
            self.ctx.events.emit("task_failed", task=task_id, round=r.number, agent=None, attempt=0, seconds=None, latency=None, error=result.error)
        r.tasks.setdefault(task_id, Task(id=task_id))
        r.settle(task_id, result)

    def _cancelled_here(self, task_id: str) -> None:
        """A task cancelled before any agent got it: recorded, what waits for it is skipped."""
        r = self.round
        if task_id in r.results or task_id in r.assigned:
            return
        # left in its queue, if it is in one: the dispatch drops a task whose future is gone
        self.waiting.pop(task_id, None)
        self.held.pop(task_id, None)
        self.ctx.events.emit("task_cancelled", task=task_id, round=r.number, agent=None, running=False)
        self._finish_unsent(task_id, TaskResult(task=task_id, ok=False, error="cancelled", attempts=0, answered=False, cancelled=True))

    def _cancel_running(self, task_id: str, answer: Future) -> None:
        """``Coordinator.cancel`` of a task an agent may hold."""
        ctx, r = self.ctx, self.round
        try:
            if task_id in r.results:
                answer.set_result(False)
                return
            agent_id = r.assigned.get(task_id)
            if agent_id is None:  # not sent yet (held for its dependencies, or queued)
                future = self.futures.get(task_id)
                if future is not None:
                    future.cancel()  # RUNNING only once sent: this succeeds
                self._cancelled_here(task_id)
                answer.set_result(True)
                return
            ctx.events.emit("task_cancelled", task=task_id, round=r.number, agent=agent_id, running=True)
            self._stop_running(task_id, TaskResult(task=task_id, ok=False, error="cancelled", agent=agent_id,
                                                   attempts=r.attempts.get(task_id, 0) + 1, answered=False, cancelled=True))
            answer.set_result(True)
        except BaseException as exc:
            answer.set_exception(exc)
            raise

    def _stop_running(self, task_id: str, result: TaskResult) -> None:
        """Record ``result`` for a task an agent holds and ask the agent to stop it.

        Recorded now: whatever the agent answers later is not taken.  Its outstanding entry
        stays until the agent answers, so it is not given more than its share meanwhile;
        :meth:`_check_timers` kills it if it does not answer within ``cancel_grace``.
        """
        ctx, r = self.ctx, self.round
        agent_id = r.assigned[task_id]
        ctx.send([ctx.factory.make(agent_id, "cancel", round=r.number, task=task_id, body={"task": task_id})])
        ctx.hook.cfn_flush(ctx=ctx, reason="explicit")
        if not result.cancelled:
            ctx.metrics.task_failures.inc()
            ctx.events.emit("task_failed", task=task_id, round=r.number, agent=agent_id, attempt=result.attempts, seconds=None, latency=None, error=result.error)
        r.settle(task_id, result)
        self.cancelling[task_id] = (agent_id, time.monotonic())

    def _cancel_requests(self, ending: bool = False) -> None:
        """`cfn cancel RUN TASK`: one request file each in ``state/cancel/``, answered in place.

        A request is the file ``<id>.request`` holding one JSON line ``{"task": task id}``;
        the answer is a second line appended to that same file, ``{"outcome": ...}`` with
        ``"cancelled"``, ``"finished"`` (nothing left to cancel), ``"unknown"`` (no such task
        in this run), ``"ended"`` (the run ended before the task finished) or ``"invalid"``;
        then the file is removed, so each request is answered once.  The requester keeps
        the file open, so it reads the answer even when the run (and its directory) ends
        right after answering.  Anything in the directory that is not a regular file of
        this user is removed unread.
        """
        import json
        import stat

        directory = os.path.join(self.ctx.bus.run_ref, "state", CANCEL_DIR)
        try:
            names = [e.name for e in os.scandir(directory) if e.name.endswith(".request")]
        except OSError:  # no request was ever made (or the run directory is going)
            return
        for name in names:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # a symlink, gone meanwhile, ...
                _unlink(path)
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    continue
                task_id = None
                try:
                    request = json.loads(os.pread(fd, 4096, 0).partition(b"\n")[0])
                    task_id = request.get("task") if isinstance(request, dict) else None
                except ValueError:
                    pass
                if not isinstance(task_id, str):
                    outcome = "invalid"
                elif task_id not in self.known:
                    outcome = "unknown"
                elif task_id in self.round.results:
                    outcome = "finished"
                elif ending:
                    outcome = "ended"
                else:
                    future = self.futures.get(task_id)
                    if future is not None and future.cancel():
                        self._cancelled_here(task_id)
                    else:
                        self._cancel_running(task_id, Future())
                    outcome = "cancelled"
                try:
                    os.write(fd, b"\n" + json.dumps({"outcome": outcome}).encode() + b"\n")
                except OSError as exc:
                    log.warning("could not answer cfn cancel (%s): %s", path, exc)
            finally:
                os.close(fd)
                _unlink(path)

    def _check_timers(self) -> None:
        """Tasks past their ``submit(timeout=...)`` are stopped; an agent that did not stop a
        cancelled task within ``cancel_grace`` is killed (and replaced)."""
        if self.deadlines:
            now = time.monotonic()
            r = self.round
            for task_id, seconds in list(self.deadlines.items()):
                if task_id in r.results:
                    del self.deadlines[task_id]
                    continue
                sent = r.sent_at.get(task_id)
                if sent is not None and now - sent > seconds:
                    del self.deadlines[task_id]
                    self._stop_running(task_id, TaskResult(
                        task=task_id, ok=False, error=f"exceeded its timeout of {seconds:g}s", agent=r.assigned[task_id],
                        attempts=r.attempts.get(task_id, 0) + 1, answered=False,
                    ))
        if not self.cancelling:
            return
        ctx = self.ctx
        grace = self.config.workload.cancel_grace
        now = time.monotonic()
        for task_id, (agent_id, asked) in list(self.cancelling.items()):
            handle = ctx.agents.get(agent_id)
            if handle is None or task_id not in handle.outstanding:
                del self.cancelling[task_id]  # it answered (or died)
            elif now - asked >= grace and handle.alive and not handle.killed_reason:
                handle.info["cancelled_kill"] = task_id
                ctx.kill(handle, f"task {task_id} was cancelled and did not stop within {grace:g}s")
                del self.cancelling[task_id]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
