"""The host process: thousands of agents as asyncio tasks in one OS process (docs/HOSTING.md).

Started by the coordinator (:mod:`cfn_core.hosting`) as ``python -m cfn_core.host
--run RUN --id _host.<role>.<k> --parent PID``.  Each hosted agent keeps everything an
agent is on the bus: its own id, inbox, settled cursor, message ids and
de-duplication, so hosted and process agents exchange messages with the same
guarantees.  What the agents of one host share is the process: one bus object, one
doorbell (the agents' doorbells are links to it: a ring names the inbox it is for,
:class:`cfn_core.bus.SharedWakeups`), one event loop and one thread pool for
synchronous handlers.

The host's own inbox (its id) carries the coordinator's orders, records of kind
``host`` with ``{"op": ...}``: ``add`` (start agents), ``kill`` (cancel one agent's
task: a task timeout, the watchdog), ``stop_agents`` (those agents read their inboxes,
then exit: one order instead of a stop record each) and ``stop``.  The host reports to the coordinator's host manager
(inbox ``_hosts``): ``exited`` for every agent task that ended (stopped,
cancelled or crashed), ``lag`` when its event loop lagged over ``[workload]
loop_lag`` (a handler that blocks the loop).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import logging
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .agent import AgentContext, AgentLoop, _Work, bootstrap_shm, describe_exception, load_handler
from .agent_api import Agent, AgentMessage, Talk
from .bus import SharedWakeups
from .errors import CfnError, ReceiveTimeout
from . import builtin
from .messages import COORDINATOR_ID, HOST_PREFIX, HOSTS_INBOX, Message

log = logging.getLogger("cfn.host")

#: descriptors a host keeps besides its agents' readers (two per inbox; idle agents give theirs back beyond)
_KEEP_READERS = 256
#: shortest interval between two sweeps of every inbox (after rings were dropped; see Host.sweep_soon)
_SWEEP_SECONDS = 0.02
#: agents started between two turns of the event loop
_ADD_SLICE = 100
#: agents woken between two turns of the event loop (Host.wake_all)
_WAKE_SLICE = 200
#: how often the loop-lag monitor wakes
_LAG_INTERVAL = 0.05
#: the host's copy of the run's directory (10,000 agents: ~40 ms to parse) is re-read after
#: this long, or when an agent asks for a name it does not know (or checks that a peer it
#: waits for is still there) and the copy is older than _DIRECTORY_REFRESH
_DIRECTORY_TTL = 2.0
_DIRECTORY_REFRESH = 0.25


#: a round no task reaches: AgentLoop.given_up reads the skip list only for rounds after it
_NEVER = float("inf")


def host_id(role: str, number: int) -> str:
    """The id (inbox, doorbell) of a role's ``number``-th host process: ``_host.<role>.<number>``.

    It starts with ``_``, which no agent id does, so a host can never be mistaken for an agent.
    """
    return f"{HOST_PREFIX}{role}.{number}"


# ---------------------------------------------------------------------- one hosted agent


class HostedTalk(Talk):
    """A hosted agent's messages: :class:`Talk`, with the directory shared by the host and async waits."""

    def __init__(self, loop: "HostedLoop"):
        super().__init__(loop)
        self.agent = AsyncAgent(self)

    def read_directory(self) -> dict[str, str]:
        self.directory = self.loop.host.directory()
        return self.directory

    def known(self, refresh: bool = False) -> dict[str, str]:
        if self.directory is None or refresh:
            self.directory = self.loop.host.directory(refresh)
        return self.directory

    async def wait_for_async(self, timeout: float | None, kind=None, sender=None, reply_to=None,
                             check: Callable[[], None] | None = None) -> AgentMessage | None:
        """:meth:`Talk.wait_for` for the event loop: waits by awaiting the agent's wake-up."""
        steps = self.waiting(timeout, kind, sender, reply_to, check)
        while True:
            try:
                sleep = next(steps)
            except StopIteration as done:
                return done.value
            await self.loop.wait_woken(sleep)


class AsyncAgent(Agent):
    """What an ``async def handle(payload, agent)`` gets: :class:`cfn_core.Agent` with awaitable waits.

    ``send``, ``broadcast``, ``publish``, ``reply``, ``status`` and ``peers`` are the
    same (they never wait for a peer); ``receive``, ``request`` and ``messages`` are
    coroutines (``await agent.receive()``, ``async for m in agent.messages(5)``).
    """

    async def receive(self, timeout: float | None = None, kind: str | None = None, sender: str | None = None) -> AgentMessage:
        message = await self._talk.wait_for_async(timeout, kind=kind, sender=sender)
        if message is None:
            wanted = "".join([f" of kind {kind!r}" if kind else "", f" from {sender}" if sender else ""])
            raise ReceiveTimeout(f"agent {self.id}: no message{wanted} within {timeout:g}s")
        return message

    async def messages(self, timeout: float | None = None, kind: str | None = None, sender: str | None = None):
        while True:
            message = await self._talk.wait_for_async(timeout, kind=kind, sender=sender)
            if message is None:
                return
            yield message

    async def request(self, to: str, body: Any, timeout: float, kind: str = "request") -> Any:
        dst, msg_id, peer_still_there = self._ask(to, body, kind)
        answer = await self._talk.wait_for_async(timeout, reply_to=msg_id, sender=dst, check=peer_still_there)
        return self._answer(answer, dst, msg_id, timeout)


class ThreadAgent:
    """The ``agent`` of a synchronous handler running in the host's thread pool.

    Every call runs on the event loop (the one reader of the agent's inbox and the
    one user of the shared bus) and the thread waits for it: the same methods as
    :class:`cfn_core.Agent`, blocking as they do in a process agent.
    """

    def __init__(self, agent: AsyncAgent, loop: asyncio.AbstractEventLoop):
        self._agent = agent
        self._loop = loop
        self.id = agent.id

    def __repr__(self) -> str:
        return f"<cfn agent {self.id} (hosted, in a thread)>"

    @property
    def role(self) -> str:
        return self._call(lambda: self._agent.role)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _await(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def peers(self, role=None):
        return self._call(lambda: self._agent.peers(role))

    def send(self, to, body, kind="msg"):
        return self._call(lambda: self._agent.send(to, body, kind))

    def broadcast(self, body, kind="msg", role=None):
        return self._call(lambda: self._agent.broadcast(body, kind, role))

    def publish(self, topic, body):
        return self._call(lambda: self._agent.publish(topic, body))

    def subscribe(self, topic):
        return self._call(lambda: self._agent.subscribe(topic))

    def reply(self, message, body):
        return self._call(lambda: self._agent.reply(message, body))

    def status(self, text, **fields):
        return self._call(lambda: self._agent.status(text, **fields))

    def receive(self, timeout=None, kind=None, sender=None):
        return self._await(self._agent.receive(timeout, kind, sender))

    def request(self, to, body, timeout, kind="request"):
        return self._await(self._agent.request(to, body, timeout, kind))

    def messages(self, timeout=None, kind=None, sender=None):
        while True:
            message = self._await(self._agent._talk.wait_for_async(timeout, kind=kind, sender=sender))
            if message is None:
                return
            yield message


def is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


class HostedAgentContext(AgentContext):
    """A hosted agent's ``ctx``.

    Its sends go through its host's ``ctx`` (one ``cfn_send``/``cfn_flush`` for all the
    host's agents: with cfn-batch, one batcher per host), after what the host's agents
    posted (:meth:`Host.post`), so every sender's order holds.  Its final counters go with
    its host's exit report, not into a state file each (10,000 of them were 7% of a host's
    time in a cold 10,000-agent run).
    """

    final_counters: dict[str, int] | None = None
    host: "Host"

    def send(self, messages: list[Message], flush: bool = False) -> None:
        self.counters["sent"] += len(messages)
        host = self.host
        host.write_posted()
        host.ctx._send(ctx=host.ctx, messages=messages, flush=flush)

    def leave_exit_counters(self) -> None:
        from .figures import final_counters

        self.final_counters = final_counters(self.counters)


class HostedLoop(AgentLoop):
    """One hosted agent: :class:`cfn_core.agent.AgentLoop`'s rules, driven by a coroutine.

    The records, their order, de-duplication and settling are the process agent's
    (the same code); what differs is waiting (an asyncio future the host resolves
    when the agent's inbox is rung) and running the handler (awaited, or in the
    host's thread pool when it is synchronous).
    """

    context_class = HostedAgentContext

    def __init__(self, host: "Host", agent_id: str, handler: Any, incarnation: int):
        super().__init__(host.config, host.pm, agent_id, host.run_ref, handler, bus=host.bus)
        self.host = host
        self.ctx.host = host
        self._flush = host.flush_sends  # its sends are the host's (HostedAgentContext.send)
        if incarnation > 1:
            # a restart inside the same host must not reuse its predecessor's message ids
            # (``<id>.<pid>.<seq>``, de-duplicated by receivers): beyond any pid (pid_max <= 2**22)
            self.ctx.factory.pid = (incarnation - 1) * 10_000_000 + os.getpid()
        self.talk = HostedTalk(self)
        self.agent = self.talk.agent
        self.to_run: deque[_Work] = deque()
        self.rung = True
        self.wake_queued = False  # in its host's to_wake (Host.wake_all)
        self._waiter: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.why_cancelled: str | None = None

    # -------------------------------------------------------------- waking

    def wake(self) -> None:
        self.rung = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_woken(self, timeout: float | None = None) -> bool:
        if not self.rung:
            self._waiter = waiter = self.host.loop.create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                return False
            finally:
                self._waiter = None
        self.rung = False
        return True

    def sleep(self, timeout: float | None = None) -> bool:  # pragma: no cover - a bug if reached
        raise RuntimeError("a hosted agent waits with wait_woken, never in the bus")

    def send_own(self, messages: list[Message]) -> None:
        self.host.post(self.ctx, messages)  # its ready and results: written with the turn's others

    def settle(self) -> None:
        if self.settled:  # after the host wrote what was posted this turn (Host.end_turn)
            self.host.ack_later(self.agent_id, self.settled)
            self.settled = []

    # -------------------------------------------------------------- tasks

    def finish(self, work: _Work) -> None:
        self.to_run.append(work)  # run by the coroutine (run), which can await the handler

    def kill_leftovers(self) -> int:
        return 0  # the host's processes are shared: nothing of one task can be told apart

    async def finish_async(self, work: _Work) -> None:
        body, t0 = self.begin_task(work)
        try:
            if body["ok"]:
                body["value"] = await self.call_handler_async(work)
        except asyncio.CancelledError:
            self.current = None
            raise  # the coordinator cancelled it (timeout): the task is re-run by a restart
        except Exception as exc:  # a handler that raises fails its task, not the agent, not its host
            self.handler_failed(body, exc)
        finally:
            self.current = None
            self.cancel_requested = False
        self.end_task(work, body, t0)

    async def call_handler_async(self, work: _Work) -> Any:
        user = self.user
        if user.gather is not None:
            return self.call_handler(work)
        if self.host.async_task(user):
            await self.start_user()
            if user.start_error is not None:
                raise RuntimeError(user.start_error)
            return await (user._task(work.payload, self.agent) if user.wants_agent else user._task(work.payload))
        agent = ThreadAgent(self.agent, self.host.loop)
        return await self.host.loop.run_in_executor(self.host.pool, user.task, work.payload, agent)

    async def start_user(self) -> None:
        user = self.user
        if user.started:
            return
        if not is_async(user.on_start):
            user.ensure_started(self.agent)
            return
        user.started = True
        try:
            await user.on_start(self.agent)
        except Exception as exc:
            user.start_error = f"on_start failed: {describe_exception(exc)}"
            log.warning("%s", user.start_error)

    async def deliver_messages_async(self) -> None:
        user = self.user
        if user.on_message is None:
            return
        while not self.queued:
            message = self.talk.next_for_handler()
            if message is None:
                return
            if not is_async(user.on_message):
                self.talk.handle_message(message)
                continue
            await self.start_user()
            try:
                await user.on_message(message, self.agent)
            except Exception as exc:
                why = f"on_message failed for message {message.id} from {message.sender}: {describe_exception(exc)}"
                log.warning("%s", why)
                self.ctx.counters["on_message_errors"] += 1
                self.talk._dead_letter(message, why)
            self.settled.append(message.receipt)

    # -------------------------------------------------------------- life

    async def run(self) -> int:
        self.pm.hook.cfn_agent_init(ctx=self.ctx)
        self.send_own([self.ctx.factory.make(COORDINATOR_ID, "ready", body={"pid": os.getpid(), "host": self.host.id})])
        while True:
            self.read_inbox()
            self.run_tasks()
            self.finish_waiting()
            if self.to_run:
                while self.to_run:
                    await self.finish_async(self.to_run.popleft())
                continue  # what arrived while they ran
            await self.deliver_messages_async()
            if self.queued:
                continue
            if self.stopping and not self.waiting:
                break
            self.settle()
            if not self.rung and self.host.forget_idle and self.host.wakeups is not None:
                self.host.forget_when_settled(self)  # its reader descriptors, until it is rung again
            await self.wait_woken()
        if self.user.on_stop is not None and self.user.started:
            try:
                result = self.user.on_stop(self.agent)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning("on_stop failed: %s", describe_exception(exc))
        self.host.end_turn("shutdown")  # what it posted, then every ack of the host's agents
        if self.settled:
            self.bus.ack(self.agent_id, self.settled)
            self.settled = []
        self.pm.hook.cfn_agent_exit(ctx=self.ctx)
        return 0


# ---------------------------------------------------------------------- the host


class HostContext(AgentContext):
    """The host's own ``ctx`` (its orders and reports): its id and ``_hosts`` are inboxes no agent has."""

    def route(self, agent_id: str) -> str:
        if agent_id in (self.agent_id, HOSTS_INBOX):
            loc = self._routes.get(agent_id)
            if loc is None:
                loc = self._routes[agent_id] = self.hook.cfn_route(agent_id=agent_id, config=self.config)
            return loc
        return super().route(agent_id)

    def leave_exit_counters(self) -> None:
        pass  # the host's counters (its plugins' figures: the agents' sends are the host's) go with every exit report


class Host:
    """One host process: its agents, its doorbell, its event loop, its thread pool."""

    def __init__(self, config, pm, host_id: str, run_ref: str):
        from .plugins import direct_caller

        self.config = config
        self.pm = pm
        self.id = host_id
        self.run_ref = run_ref
        self.ctx = HostContext(config, pm, host_id, run_ref)
        self.ctx.bus = self.bus = pm.hook.cfn_bus(config=config, run_ref=run_ref)
        #: the bus again, as the optional SharedWakeups protocol (None when the transport lacks it:
        #: then every agent listens on a doorbell of its own, and a restart cannot re-read in place)
        self.wakeups: SharedWakeups | None = self.bus if isinstance(self.bus, SharedWakeups) else None
        self.shared = self.wakeups is not None
        self.bus.listen(host_id)
        self._read = direct_caller(pm, "cfn_read")
        self._flush = direct_caller(pm, "cfn_flush")
        #: only the baseline sends: posted records are written grouped per destination (Host.write_posted)
        self.direct_send = self.ctx._send is builtin.cfn_send
        self.posted: list[tuple[Message, bytes]] = []  # the agents' ready and results, written at the turn's end
        self.acks: list[tuple[str, list]] = []  # their acks, applied after that
        self.to_forget: list[HostedLoop] = []  # idle agents giving back their descriptors after their acks
        self.turn_end_due = False
        self.agents: dict[str, HostedLoop] = {}
        self.incarnations: dict[str, int] = {}
        self.handlers: dict[str, Any] = {}  # role -> handler
        self.pending_adds: deque[str] = deque()
        #: ids whose add order said "fresh" (their first launch in the session), not started yet
        self.fresh: set[str] = set()
        self.to_wake: deque[HostedLoop] = deque()  # agents to wake in the next slices (wake_all)
        self.adding: deque[str] = deque()  # ids of add orders not started yet
        self.adder: asyncio.Task | None = None
        self.exits: list[list] = []  # [agent id, exit code, why, final counters] not reported yet
        self.sweep_at: asyncio.TimerHandle | None = None
        self.last_sweep = 0.0
        self.pool = ThreadPoolExecutor(max_workers=max(4, min(32, (os.cpu_count() or 1) * 4)), thread_name_prefix="cfn-host")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.done: asyncio.Future | None = None
        self._directory: dict[str, str] | None = None
        self._directory_at = 0.0
        self.lag_threshold = config.workload.loop_lag
        self.lags = 0
        self.worst_lag = 0.0
        self.forget_idle = False
        import resource

        self.fd_budget = int(resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 0.8)

    # -------------------------------------------------------------- shared by the agents

    def directory(self, refresh: bool = False) -> dict[str, str]:
        """The run's directory (agent id -> role), read once for all the host's agents."""
        now = time.monotonic()
        age = now - self._directory_at
        if self._directory is None or (refresh and age > _DIRECTORY_REFRESH) or age > _DIRECTORY_TTL:
            talk = Talk.__new__(Talk)  # the parsing of Talk.read_directory, without an agent
            talk.bus = self.bus
            self._directory = Talk.read_directory(talk)
            self._directory_at = now
        return self._directory

    def async_task(self, user) -> bool:
        return is_async(user._task)

    # -------------------------------------------------------------- the agents' records, per turn

    def post(self, ctx: AgentContext, messages: list[Message]) -> None:
        """Queue an agent's own records (ready, results) for the end of this turn of the loop.

        The 200 agents of one wake-up slice answering the coordinator were 200 appends to
        its inbox, each locked and rung; written together they are one (per destination).
        Encoded now, so that a record too large raises in the agent (MessageTooLarge), as
        a send does.  The agents' acks wait for the write (:meth:`ack_later`): a host that
        dies before it loses both, and a replacement re-reads the tasks (exactly once per
        attempt, as before).
        """
        limit = self.config.bus.max_message_bytes
        self.posted.extend((m, m.encode(limit)) for m in messages)
        ctx.counters["sent"] += len(messages)
        self._end_turn_soon()

    def ack_later(self, agent_id: str, receipts: list) -> None:
        """Ack an agent's records after what was posted before them is written (:meth:`end_turn`)."""
        self.acks.append((agent_id, receipts))
        self._end_turn_soon()

    def forget_when_settled(self, hosted: HostedLoop) -> None:
        self.to_forget.append(hosted)
        self._end_turn_soon()

    def _end_turn_soon(self) -> None:
        if not self.turn_end_due:
            self.turn_end_due = True
            self.loop.call_soon(self.end_turn)

    def end_turn(self, reason: str = "explicit") -> None:
        """Write what the agents posted, then apply their acks (in that order), then let idle ones forget."""
        self.turn_end_due = False
        try:
            self.flush_sends(self.ctx, reason)
        except (CfnError, OSError) as exc:  # a full bus: not acked, so a replacement re-reads them
            log.warning("host %s could not write its agents' records: %s", self.id, exc)
            self.acks, self.to_forget = [], []
            return
        acks, self.acks = self.acks, []
        for agent_id, receipts in acks:
            self.bus.ack(agent_id, receipts)
        forget, self.to_forget = self.to_forget, []
        for hosted in forget:
            if not hosted.rung and self.agents.get(hosted.agent_id) is hosted:
                self.wakeups.forget(hosted.agent_id, idle=True)

    def write_posted(self) -> None:
        """Write the posted records now: grouped per destination, or handed to the plugins'
        ``cfn_send`` (then the caller flushes)."""
        posted = self.posted
        if not posted:
            return
        self.posted = []
        counters = self.ctx.counters  # the host's own: reported under its id (send_exits)
        counters["host_records_posted"] += len(posted)
        counters["host_posted_writes"] += 1
        if self.direct_send:
            by_dst: dict[str, list[bytes]] = {}
            for msg, data in posted:
                records = by_dst.get(msg.dst)
                if records is None:
                    by_dst[msg.dst] = [data]
                else:
                    records.append(data)
            route = self.ctx.route
            builtin.deliver_all(self.bus, [(dst, route(dst), records) for dst, records in by_dst.items()])
        else:  # the caller flushes next
            self.ctx._send(ctx=self.ctx, messages=[msg for msg, _ in posted], flush=True)

    def flush_sends(self, ctx: AgentContext, reason: str) -> None:
        """A hosted agent's ``cfn_flush``: its sends went through the host's ``ctx``."""
        self.write_posted()
        self._flush(ctx=self.ctx, reason=reason)

    # -------------------------------------------------------------- serving

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.loop.add_reader(self.bus.wake_fd(self.id), self.on_wake)
        lag = asyncio.ensure_future(self.watch_lag())
        self.pm.hook.cfn_agent_init(ctx=self.ctx)  # its agents send through its ctx (HostedAgentContext)
        self.read_orders()
        try:
            await self.done
            self.pm.hook.cfn_agent_exit(ctx=self.ctx)  # the plugins' final flush of the host's sends
            self.send_exits(final=True)
        finally:
            lag.cancel()
            self.loop.remove_reader(self.bus.wake_fd(self.id))
        return 0

    def on_wake(self) -> None:
        if not self.shared:
            self.bus.drain_wakeups(self.id)
            self.read_orders()
            return
        ids = self.wakeups.woken(self.id)
        if ids is None:  # rings may have been dropped: every inbox is read once, soon
            self.sweep_soon()
            return
        agents = self.agents
        woken = []
        for agent_id in ids:
            hosted = agents.get(agent_id)
            if hosted is not None:
                woken.append(hosted)
            elif agent_id == self.id:
                self.read_orders()
        self.wake_all(woken)

    def wake_all(self, agents: list[HostedLoop]) -> None:
        """Wake agents, at most ``_WAKE_SLICE`` per turn of the loop.

        Woken at once, 5,000 agents that each read a task and answer ran in one turn of
        the loop (asyncio runs every callback ready when a turn starts), 0.4 s in which no
        timer fired and the lag watch blamed a handler.  In slices, the loop turns every
        few milliseconds; the total work is the same.  A few agents are woken at once.
        """
        to_wake = self.to_wake
        if not to_wake and len(agents) <= _WAKE_SLICE:
            for hosted in agents:
                hosted.wake()
            return
        if not to_wake:
            self.loop.call_soon(self.wake_slice)
        for hosted in agents:
            if not hosted.wake_queued:  # a sweep while the last one is still waking: once each
                hosted.wake_queued = True
                to_wake.append(hosted)

    def wake_slice(self) -> None:
        to_wake = self.to_wake
        for _ in range(min(_WAKE_SLICE, len(to_wake))):
            hosted = to_wake.popleft()
            hosted.wake_queued = False
            hosted.wake()
        if to_wake:
            self.loop.call_soon(self.wake_slice)

    def sweep_soon(self) -> None:
        """Wake every agent (each reads its inbox once), at most every ``_SWEEP_SECONDS``.

        After a full doorbell queue some rings were dropped, so every inbox may hold
        unread records; in a burst the queue overflows again and again, and a sweep per
        overflow would wake every agent for every few records (quadratic).  One sweep
        after the last overflow of each interval reads everything that arrived before it.
        """
        if self.sweep_at is not None:
            return  # one is scheduled: it runs after this overflow
        now = self.loop.time()
        delay = max(0.0, self.last_sweep + _SWEEP_SECONDS - now)
        self.sweep_at = self.loop.call_later(delay, self.sweep)

    def sweep(self) -> None:
        self.sweep_at = None
        self.last_sweep = self.loop.time()
        self.read_orders()
        self.wake_all(list(self.agents.values()))

    def read_orders(self) -> None:
        messages = self._read(ctx=self.ctx, agent_id=self.id)
        for msg in messages:
            body = msg.body if isinstance(msg.body, dict) else {}
            op = body.get("op")
            if msg.src != COORDINATOR_ID or msg.kind != "host":
                log.warning("host %s: %s record from %s ignored", self.id, msg.kind, msg.src[:80])
            elif op == "add":
                ids = [a for a in body.get("agents") or () if isinstance(a, str)]
                if body.get("fresh") is True:
                    self.fresh.update(ids)
                self.adding.extend(ids)
                if self.adder is None or self.adder.done():
                    self.adder = self.loop.create_task(self.add_all())
            elif op == "kill":
                self.cancel(body.get("agent"), str(body.get("reason") or "killed"))
            elif op == "stop_agents":
                self.stop_agents([a for a in body.get("agents") or () if isinstance(a, str)])
            elif op == "stop":
                self.stopping = True
        if messages:
            self.bus.ack(self.id, [m.receipt for m in messages])
        if self.stopping and not self.agents and not self.adding and not self.done.done():
            self.done.set_result(None)

    async def add_all(self) -> None:
        """Start the agents of add orders, a slice at a time: the loop serves the started ones meanwhile."""
        while self.adding:
            for _ in range(min(_ADD_SLICE, len(self.adding))):
                self.add(self.adding.popleft())
            # the agents just started live as long as the host: out of the collector's sight.
            # Otherwise each 25% growth of the heap while thousands start triggers a full
            # collection over all of them, longer each time (0.26 s to 1 s turns of the loop,
            # reported as lag, with 50,000 agents a host; 10,000 agents started 0.15 s sooner
            # without).  The price: what was alive at that moment and later becomes garbage
            # in a reference cycle (a restarted agent's old loop, ~12 KiB) stays until the
            # host ends; freed by reference counting, everything else goes as usual.
            gc.freeze()
            await asyncio.sleep(0)

    def add(self, agent_id: str) -> None:
        from .roles import role_of

        existing = self.agents.get(agent_id)
        if existing is not None:  # its previous task is ending (a kill): start it after that
            self.pending_adds.append(agent_id)
            return
        role = role_of(self.config, agent_id)
        handler = self.handlers.get(role.name)
        if handler is None:
            handler = self.handlers[role.name] = load_handler(role)
        n = self.incarnations[agent_id] = self.incarnations.get(agent_id, 0) + 1
        try:
            if self.shared:
                self.wakeups.listen_shared(agent_id, self.id)  # before its first read: no wake-up is lost
            else:
                self.bus.listen(agent_id)
            hosted = HostedLoop(self, agent_id, handler, n)
            if agent_id in self.fresh:
                self.fresh.discard(agent_id)
                if n == 1:  # no skip list can exist for it: the coordinator writes one only before a relaunch
                    hosted.skip_read_for = _NEVER
            if not self.shared:
                fd = self.bus.wake_fd(agent_id)
                self.loop.add_reader(fd, self._wake_one, agent_id)
        except CfnError as exc:
            self.report_exit(agent_id, 3, f"could not start: {exc}")
            return
        self.agents[agent_id] = hosted
        # two reader descriptors per inbox: an idle agent gives its back when they would run out
        self.forget_idle = 2 * len(self.agents) + _KEEP_READERS > self.fd_budget
        hosted.task = task = self.loop.create_task(hosted.run(), name=agent_id)
        task.add_done_callback(lambda t, a=agent_id: self.ended(a, t))

    def _wake_one(self, agent_id: str) -> None:
        self.bus.drain_wakeups(agent_id)
        hosted = self.agents.get(agent_id)
        if hosted is not None:
            hosted.wake()

    def stop_agents(self, agent_ids: list[str]) -> None:
        """A ``stop_agents`` order: as if each agent had read a stop record (it reads its inbox, then exits)."""
        stopping = []
        for agent_id in agent_ids:
            if agent_id in self.pending_adds:  # killed and waiting to restart: it stays stopped
                self.pending_adds.remove(agent_id)
            hosted = self.agents.get(agent_id)
            if hosted is not None:
                hosted.stopping = True
                stopping.append(hosted)
            elif agent_id in self.adding:  # not started yet: nothing to read, it ends here
                self.adding.remove(agent_id)
                self.report_exit(agent_id, 0, None)
        self.wake_all(stopping)

    def cancel(self, agent_id: Any, reason: str) -> None:
        hosted = self.agents.get(agent_id) if isinstance(agent_id, str) else None
        if hosted is not None and hosted.task is not None and not hosted.task.done():
            hosted.why_cancelled = reason
            hosted.task.cancel()

    def ended(self, agent_id: str, task: asyncio.Task) -> None:
        """An agent's task ended: stopped (0), cancelled by the coordinator (-9) or crashed (1)."""
        hosted = self.agents.pop(agent_id, None)
        if task.cancelled():
            code, why = -signal.SIGKILL, hosted.why_cancelled if hosted is not None else "cancelled"
        elif task.exception() is not None:
            code, why = 1, describe_exception(task.exception())
            log.warning("hosted agent %s crashed: %s", agent_id, why)
        else:
            code, why = 0, None
        if not self.shared:
            try:
                self.loop.remove_reader(self.bus.wake_fd(agent_id))
            except (OSError, ValueError):
                pass
        if self.posted or self.acks:
            self.end_turn()  # its acks before its reader state goes
        if self.wakeups is not None:
            self.wakeups.forget(agent_id)  # a restart here reads again what this one had not settled
        self.report_exit(agent_id, code, why, hosted.ctx.final_counters if hosted is not None else None)
        if agent_id in self.pending_adds:
            self.pending_adds.remove(agent_id)
            self.add(agent_id)
        if self.stopping and not self.agents and not self.done.done():
            self.done.set_result(None)

    def report_exit(self, agent_id: str, code: int, why: str | None, counters: dict[str, int] | None = None) -> None:
        """Queue an ``exited`` report (with the agent's final counters when it ended normally);
        those of one turn of the loop travel in one record."""
        if not self.exits:
            self.loop.call_soon(self.send_exits)
        self.exits.append([agent_id, code, why, counters])

    def send_exits(self, final: bool = False) -> None:
        """Report the agents that ended, with the host's own counters (on the coordinator:
        ``agent_counters()`` under the host's id); the ``final`` report even with none."""
        from .figures import final_counters

        exits, self.exits = self.exits, []
        if exits or final:
            self.report("exited", agents=exits, pid=os.getpid(), counters=final_counters(self.ctx.counters))

    def report(self, op: str, **body: Any) -> None:
        """Tell the coordinator's host manager (inbox ``_hosts``); a full bus is logged, not raised."""
        body.update(op=op, host=self.id)
        try:
            self.write_posted()  # the agents' results before the report of their end
            self.ctx.send([self.ctx.factory.make(HOSTS_INBOX, "host", body=body)])
            self._flush(ctx=self.ctx, reason="explicit")
        except (CfnError, OSError) as exc:
            log.warning("host %s could not report %s: %s", self.id, op, exc)

    async def watch_lag(self) -> None:
        """Measure how late the loop wakes: a handler that blocks it delays every agent of the host."""
        loop = self.loop
        while True:
            t0 = loop.time()
            await asyncio.sleep(_LAG_INTERVAL)
            lag = loop.time() - t0 - _LAG_INTERVAL
            if lag > self.lag_threshold:
                self.lags += 1
                self.worst_lag = max(self.worst_lag, lag)
                log.warning("host %s: event loop blocked for %.3fs (a handler that does not await, or more agents "
                            "ready at once than the host runs in loop_lag)", self.id, lag)
                self.report("lag", seconds=round(lag, 6), agents=len(self.agents), count=self.lags)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.bus.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.host", description="one cfn host process (hosted agents)")
    parser.add_argument("--run", required=True, help="run reference (the shm run directory)")
    parser.add_argument("--id", required=True, help="host id (_host.<role>.<k>)")
    parser.add_argument("--parent", type=int, required=True, help="pid of the coordinator; the host dies with it")
    args = parser.parse_args(argv)
    from .plugins import make_plugin_manager
    from .process import die_with_parent, ensure_fd_limit

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's (see cfn_core.agent.main)
    logging.basicConfig(level=logging.WARNING, format=f"cfn host {args.id}: %(message)s")
    try:
        import resource

        ensure_fd_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1], "a host process")
    except (CfnError, ValueError, OSError):
        pass
    try:
        config = bootstrap_shm(args.run)
        pm = make_plugin_manager(config)
        host = Host(config, pm, args.id, args.run)
        try:
            return asyncio.run(host.serve())
        finally:
            host.close()
    except CfnError as exc:
        print(f"cfn host {args.id}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
