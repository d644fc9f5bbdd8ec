"""The agent process: read inbox -> run handler -> send result.

Started as ``python -m cfn_core.agent --run RUN --id ID --parent PID`` (the
baseline) or forked from a warm parent that calls :func:`run_agent` (cfn-pool).

The loop, in order: read new messages; run tasks (a mesh task first sends its
peer messages, then waits for the peer messages it expects); flush what plugins
buffered; settle (ack) every message whose work is complete and flushed; sleep
on the doorbell when nothing is left.  A message is acked only after the
result it led to was handed to the bus and flushed, so a replacement of an
agent that died re-reads exactly the unfinished work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict, deque
from typing import Any, Callable

import orjson

from .agent_api import RateLimited, Talk, UserCode
from .errors import CfnError, ConfigError, MessageTooLarge
from .figures import final_counters
from .messages import COORDINATOR_ID, Message, MessageFactory, check_agent_id, peer_message_id
from .plugins import direct_caller
from .process import child_pids, kill_leftovers

log = logging.getLogger("cfn.agent")

_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class AgentContext:
    """What agent-side hooks get as ``ctx``."""

    side = "agent"

    def __init__(self, config, pm, agent_id: str, run_ref: str):
        self.config = config
        self.pm = pm
        self.hook = pm.hook
        self.agent_id = self.self_id = agent_id
        self.run_ref = run_ref
        self.bus = None
        self.state: dict[str, Any] = {}
        self.factory = MessageFactory(agent_id)
        self.counters = defaultdict(int)
        self.fallbacks: dict[str, dict] = {}
        self._routes: dict[str, str] = {}
        self._send = direct_caller(pm, "cfn_send")

    def route(self, agent_id: str) -> str:
        """Where ``agent_id``'s inbox is.  Raises ConfigError for an id that is not an agent's.

        Destinations come from messages (a ping's sender, a task's peers): an id is
        checked before it can become a path, once per process (the route is kept).
        """
        loc = self._routes.get(agent_id)
        if loc is None:
            if agent_id != COORDINATOR_ID:
                check_agent_id(agent_id)
            loc = self._routes[agent_id] = self.hook.cfn_route(agent_id=agent_id, config=self.config)
        return loc

    def send(self, messages: list[Message], flush: bool = False) -> None:
        """Hand messages to ``cfn_send``; ``flush``: the caller flushes next (see the hook)."""
        self.counters["sent"] += len(messages)
        self._send(ctx=self, messages=messages, flush=flush)

    def leave_exit_counters(self) -> None:
        """Leave this agent's final counters for the coordinator (:mod:`cfn_core.figures`), in the
        run's shared state; a hosted agent's travel with its host's exit report instead."""
        from .figures import publish_exit_counters

        publish_exit_counters(self.bus, self.agent_id, os.getpid(), self.counters)

    def note_fallback(self, hook: str, plugin: str | None, exc: BaseException) -> None:
        from .fallback import record_fallback

        record_fallback(self, hook, plugin, exc)


# ---------------------------------------------------------------------- handlers


def load_handler(workload, policy=None) -> Callable[..., Any]:
    """The callable (or class agent) that runs tasks, from a role's ``handler`` or ``command``.

    :param workload: a :class:`cfn_core.roles.Role` (``roles.role_of(config, agent_id)``:
        ``[agents.<role>]`` over ``[workload]``), or the ``[workload]`` settings themselves
        (the one-role shorthand); anything with ``handler``, ``command``, ``timeout`` and
        ``directory``.
    :param policy: the ``[workload]`` settings whose failure policy a command follows
        (``retry_on_exit``, ``stall_seconds``, ``command_max_rss_mb``...); None: the defaults.
    :raises ConfigError: when the handler cannot be imported (named with the reason).
    """
    where = getattr(workload, "label", "[workload]")  # the table that set it, for the messages
    # relative names resolve against [workload] directory: by default the cfn.toml's (docs/CONFIG.md)
    directory = getattr(workload, "directory", "") or None
    if workload.command:
        if policy is None:  # a Role carries its run's [workload] policy
            policy = getattr(workload, "policy", None)
        return _command_handler(workload.command, workload.timeout, cwd=directory, policy=policy)
    spec = workload.handler
    if not _HANDLER_RE.match(spec):
        raise ConfigError(f"{where} handler = {spec!r}: must be 'module:function', e.g. 'cfn_core.handlers:echo'")
    modname, _, funcname = spec.partition(":")
    # agents run as `python -m cfn_core.agent` in the coordinator's working directory, which
    # puts that directory on their sys.path; the coordinator (a console script) looks there too
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    if directory is not None and directory not in sys.path:
        sys.path.insert(0, directory)  # the module next to the cfn.toml that names it comes first
    try:
        module = importlib.import_module(modname)
    except SystemExit as exc:  # sys.exit() at import time must not end the coordinator with its text alone
        raise ConfigError(
            f"{where} handler = {spec!r}: importing module {modname!r} called sys.exit({exc.code!r})"
        ) from None
    except Exception as exc:
        raise ConfigError(f"{where} handler = {spec!r}: cannot import module {modname!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, funcname, None)
    if not callable(func):
        raise ConfigError(f"{where} handler = {spec!r}: module {modname!r} has no function {funcname!r}")
    # a class agent is a class with any of the on_* methods; any other class is a plain
    # callable (``builtins:set``), as it always was
    hooks = ("on_start", "on_task", "on_message", "on_stop")
    if isinstance(func, type) and any(callable(getattr(func, h, None)) for h in hooks) and not callable(
        getattr(func, "on_task", None)
    ):
        raise ConfigError(
            f"{where} handler = {spec!r}: class {funcname!r} has no method on_task(self, payload, agent) "
            "(a class agent may also define on_start, on_message and on_stop)"
        )
    return func


class CommandFailed(Exception):
    """A command's task failed.  ``failure`` is its class, what the coordinator's policy acts on:
    ``error`` (fails), ``retry`` (retried, an attempt), ``fatal`` (fails, never retried),
    ``rate_limited`` (re-queued, not an attempt), ``timeout``, ``stalled`` (retried), ``oom``."""

    def __init__(self, message: str, stderr: str, failure: str = "error"):
        super().__init__(message)
        self.stderr = stderr
        self.failure = failure


#: what a command that hit ``command_max_rss_mb`` (RLIMIT_AS) tends to print or die of
_OOM_RE = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc|memory exhausted", re.I)
_OOM_STATUSES = {128 + signal.SIGSEGV, 128 + signal.SIGABRT, 128 + signal.SIGBUS, -signal.SIGSEGV, -signal.SIGABRT}


def classify_exit(status: int, output: str, policy) -> str:
    """The failure class of a command that exited with ``status`` (non-zero), under ``policy``."""
    if policy is None:
        return "error"
    if status in policy.rate_limit_exit or (policy.rate_limit_pattern and re.search(policy.rate_limit_pattern, output)):
        return "rate_limited"
    if policy.command_max_rss_mb and (status in _OOM_STATUSES or _OOM_RE.search(output)):
        return "oom"
    if status in policy.fatal_on_exit:
        return "fatal"
    if status in policy.retry_on_exit or policy.on_other_exit == "retry":
        return "retry"
    return "error"


#: How a command runs.  When its agent dies (even by SIGKILL, or with its coordinator) the
#: kernel sends the shell SIGTERM (PR_SET_PDEATHSIG, set before exec), and the shell's trap
#: kills the command's whole process group: no command outlives its agent.  The command is
#: an asynchronous list so the trap runs at once (a shell runs traps only between commands),
#: with the payload on its stdin through fd 3; the shell exits with the command's status.
_GUARDED = 'exec 3<&0\ntrap "kill -KILL 0" TERM\n(\n{command}\n) <&3 3<&- &\nwait $!\n'


def _term_with_agent(agent_pid: int, max_as_bytes: int = 0) -> Callable[[], None]:
    import ctypes
    import resource  # imported here, not in the forked child

    libc = ctypes.CDLL(None)

    def preexec() -> None:  # in the forked child, before exec
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != agent_pid:  # the agent died before the prctl
            os._exit(1)
        if max_as_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (max_as_bytes, max_as_bytes))

    return preexec


def _command_handler(command: str, timeout: float, cwd: str | None = None, policy=None) -> Callable[[Any, Any], Any]:
    from .usage import add_usage, usage_from_stderr

    script = _GUARDED.format(command=command)
    stall = policy.stall_seconds if policy is not None else 0.0
    stall_kill = policy.stall_kill_seconds if policy is not None else 0.0
    max_as = (policy.command_max_rss_mb << 20) if policy is not None else 0

    def run_command(payload: Any, agent: Any) -> str:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        talk = agent._talk
        loop = talk.loop
        env = dict(os.environ)
        current = loop.current
        env.update(CFN_AGENT_ID=agent.id, CFN_ROLE=agent.role, CFN_TASK_ID=(current.task or "") if current else "")
        server = None
        run_dir = getattr(loop.bus, "run_dir", None)
        if run_dir is not None:
            from .agent_socket import AgentSocket, socket_path

            path = socket_path(os.fspath(run_dir), agent.id)
            if len(path.encode()) < 100:  # AF_UNIX paths are short; without it `cfn msg` says so
                server = AgentSocket(talk, path)
                env["CFN_AGENT_SOCKET"] = path
        if server is None:
            env.pop("CFN_AGENT_SOCKET", None)
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_term_with_agent(os.getpid(), max_as),
            cwd=cwd,
            env=env,
        )

        def on_stall(silent: float) -> None:  # marked, not yet killed: visible as the agent's status
            agent.status("stalled", task=env["CFN_TASK_ID"], silent_seconds=round(silent, 3))

        try:
            stdout, stderr, ended = _serve_command(
                proc, data.encode(), timeout, loop, server, stall=stall, stall_kill=stall_kill, on_stall=on_stall
            )
        finally:
            if server is not None:
                server.close()
        usage = usage_from_stderr(stderr)
        if usage:
            talk.usage_in_task = add_usage(talk.usage_in_task or {}, usage)
        if ended == "timeout":
            raise CommandFailed(f"command timed out after {timeout:g}s", _tail(stderr), "timeout") from None
        if ended == "stalled":
            raise CommandFailed(
                f"command stalled: no output for {stall + stall_kill:g}s (stall_seconds = {stall:g}, "
                f"stall_kill_seconds = {stall_kill:g}); killed",
                _tail(stderr),
                "stalled",
            ) from None
        # The command is done, its helpers too: `server & echo ok` must not leave `server`
        # running.  Its process group (the shell's session) goes first; what left the group
        # (setsid, setpgid) was re-parented to this agent, a subreaper, and the loop's
        # kill_leftovers after the task takes it.
        _kill_group(proc.pid)
        if proc.returncode != 0:
            tail = _tail(stderr)
            last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
            # the last stderr line in the error itself: it is what the summary shows
            failure = classify_exit(proc.returncode, _tail(stdout) + "\n" + tail, policy)
            why = f"command exited with status {proc.returncode}" + (f": {last[:200]}" if last else "")
            if failure == "oom":
                why = f"out of memory: command exceeded command_max_rss_mb = {policy.command_max_rss_mb} ({why})"
            raise CommandFailed(why, tail, failure)
        return stdout.decode("utf-8", "replace")

    return run_command


def _serve_command(
    proc, data: bytes, timeout: float, loop, server, *, stall: float = 0.0, stall_kill: float = 0.0, on_stall=None
) -> tuple[bytes, bytes, str | None]:
    """Feed the command its stdin, collect stdout/stderr, serve its socket and read the inbox.

    Returns ``(stdout, stderr, ended)``: ``ended`` is None when the command exited,
    ``"timeout"`` or ``"stalled"`` when it was killed (its whole process group) for
    running past ``timeout`` or for being silent ``stall + stall_kill`` seconds
    (``on_stall(silent)`` is called once after ``stall`` seconds of silence).
    """
    import selectors

    deadline = time.monotonic() + timeout
    last_output = time.monotonic()
    marked = False
    sel = selectors.DefaultSelector()
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    done: dict = {}
    view = memoryview(data)
    try:
        for pipe in out:
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, selectors.EVENT_READ, ("pipe", pipe))
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE, ("stdin", None))
        else:
            proc.stdin.close()
        if server is not None:
            server.register(sel)
            sel.register(loop.bus.wake_fd(loop.agent_id), selectors.EVENT_READ, ("bell", None))
        while out:  # until both output pipes reach their end
            now = time.monotonic()
            ended = None
            if now >= deadline:
                ended = "timeout"
            elif stall and now - last_output >= stall:
                if not marked:
                    marked = True
                    if on_stall is not None:
                        on_stall(now - last_output)
                if now - last_output >= stall + stall_kill:
                    ended = "stalled"
            if ended is not None:
                # kill the whole process group: killing only the shell would orphan its children
                _kill_group(proc.pid)
                for pipe, buf in out.items():  # what they wrote before they died (the stderr shown)
                    os.set_blocking(pipe.fileno(), True)
                    buf += pipe.read()
                    done[pipe] = bytes(buf)
                proc.wait()
                return done.get(proc.stdout, b""), done.get(proc.stderr, b""), ended
            wait = deadline - now
            if stall:
                wait = min(wait, max(0.0, (stall if not marked else stall + stall_kill) - (now - last_output)) + 0.001)
            if server is not None:
                due = server.poll(sel)
                if due is not None:
                    wait = min(wait, due)
            for key, _ in sel.select(wait):
                what, obj = key.data
                if what == "pipe":
                    chunk = os.read(obj.fileno(), 65536)
                    if chunk:
                        out[obj] += chunk
                        last_output = time.monotonic()
                        marked = False
                    else:
                        sel.unregister(obj)
                        done[obj] = bytes(out.pop(obj))
                elif what == "stdin":
                    try:
                        n = os.write(proc.stdin.fileno(), view[:65536])
                    except BrokenPipeError:  # the command does not read its stdin: fine
                        n = len(view)
                    view = view[n:]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                elif what == "bell":
                    loop.bus.drain_wakeups(loop.agent_id)
                    loop.read_inbox()
                    if loop.cancel_requested:  # Coordinator.cancel: the command's whole group goes
                        _kill_group(proc.pid)
                        proc.wait()
                        from .errors import Cancelled

                        raise Cancelled(f"task {loop.current.task} was cancelled")
                else:
                    server.on_event(sel, what, obj)
        proc.wait()  # its pipes are closed: the shell has exited or is about to
        return done.get(proc.stdout, b""), done.get(proc.stderr, b""), None
    finally:
        sel.close()
        if proc.stdin and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _kill_group(pgid: int) -> None:
    """SIGKILL a command's process group (its shell's pid: the shell leads a session of its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left in it
        pass


def _tail(data: bytes | None, limit: int = 2000) -> str:
    if not data:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` for a person to read.  Never raises, whatever ``exc`` is.

    A handler's exception may have a ``__str__`` that raises (or returns something
    that is not a string): that must fail the task, not the agent.
    """
    try:
        name = type(exc).__name__
        if not isinstance(name, str):
            raise TypeError("__name__ is not a string")
    except Exception:
        name = "exception"
    try:
        text = str(exc)
    except Exception as inner:
        try:
            why = type(inner).__name__
        except Exception:
            why = "an exception"
        text = f"(its str() raised {why})"
    return f"{name}: {text}"


# ---------------------------------------------------------------------- the loop


#: task records remembered for de-duplication (their message ids): a copy of a record
#: (a sender that wrote a batch twice, a transport's redelivery) arrives soon after it
_RECENT_TASKS = 4096


class _RecentIds:
    """The last ``size`` ids seen, in bounded memory (a pooled agent serves many rounds)."""

    __slots__ = ("ids", "order")

    def __init__(self, size: int):
        self.ids: set[str] = set()
        self.order: deque[str] = deque(maxlen=size)

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it is one of the recent ones already."""
        if key in self.ids:
            return False
        if len(self.order) == self.order.maxlen:
            self.ids.discard(self.order[0])
        self.order.append(key)
        self.ids.add(key)
        return True


class _Work:
    """One task in progress inside the agent.

    ``error`` is set when the task cannot run (its record names peers that are not
    agent ids, or its peer messages could not be sent): it then fails with that reason.
    """

    __slots__ = ("msg", "payload", "peers", "expect", "error")

    def __init__(self, msg: Message):
        body = msg.body if isinstance(msg.body, dict) else {}
        self.msg = msg
        self.payload = body.get("payload")
        self.error: str | None = None
        peers = body.get("peers")
        if peers is None:
            peers = []
        elif not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            self.error = f"task {msg.task}: 'peers' must be a list of agent ids, not {_short(peers)}"
            peers = []
        self.peers: list[str] = peers
        expect = body.get("expect", 0)
        self.expect = expect if isinstance(expect, int) and not isinstance(expect, bool) else 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AgentLoop:
    """One agent's life: read its inbox, run tasks, answer, settle; the object behind :func:`run_agent`.

    The loop, in order (:meth:`run`): :meth:`read_inbox` takes new records and sorts them
    (:meth:`absorb`: tasks queue up, peer and user messages are kept, a stop is noted,
    a ping answered); :meth:`run_tasks` runs the queued tasks (a mesh task first sends its
    peer messages, then waits in :attr:`waiting` for those it expects); :meth:`finish_waiting`
    completes mesh tasks whose peer messages arrived; :meth:`deliver_messages` hands queued
    user messages to a class agent's ``on_message`` when no task runs; :meth:`settle` flushes
    what plugins buffered and acks every record whose work is complete and flushed;
    :meth:`sleep` waits on the doorbell.  A record is acked only after the result it led to
    was handed to the bus and flushed, so a replacement of an agent that died re-reads
    exactly the unfinished work.

    User code may read the inbox too, while a task runs (``agent.receive``): it goes
    through :meth:`read_inbox` as well, so a task or a stop that arrives meanwhile is queued
    for the loop, never run inside the handler that is waiting.
    """

    #: the class of its ``ctx`` (a hosted agent's reports its final counters to its host)
    context_class: type[AgentContext] = AgentContext

    def __init__(self, config, pm, agent_id: str, run_ref: str, handler: Callable | None = None, bus=None):
        check_agent_id(agent_id)
        self.config = config
        self.pm = pm
        self.agent_id = agent_id
        self.ctx = ctx = self.context_class(config, pm, agent_id, run_ref)
        if bus is None:
            ctx.bus = self.bus = pm.hook.cfn_bus(config=config, run_ref=run_ref)
            self.bus.listen(agent_id)  # bind the doorbell before the first read
        else:  # a host's shared bus (cfn_core.host): the host arranged the wake-ups
            ctx.bus = self.bus = bus
        if handler is None:
            from .roles import role_of

            handler = load_handler(role_of(config, agent_id), policy=config.workload)  # its role's handler or command
        self.user = UserCode(handler)
        self._read = direct_caller(pm, "cfn_read")
        self._flush = direct_caller(pm, "cfn_flush")
        self.helpers: frozenset[int] = frozenset()
        self.queued: deque[Message] = deque()  # task records read, not yet started
        self.waiting: list[_Work] = []  # mesh tasks waiting for their peer messages
        self.peers_seen: dict[int, dict[str, Any]] = defaultdict(dict)  # round -> peer message id -> body
        self.held: dict[int, list] = defaultdict(list)  # round -> receipts of peer messages settled with its task
        self.newest_round = 0  # of the tasks started so far
        self.skip: set[tuple[int, str]] = set()  # (round, task) the coordinator gave up on
        self.skip_read_for: int | None = None  # the round the skip list was last read for
        self.settled: list = []
        self.stopping = False
        self.unflushed = False  # a result handed to cfn_send since the last flush
        # Task records started by this incarnation, by message id: a copy of a record already
        # run (or running) is settled without running again.  Message ids, not task ids or
        # rounds: a pooled session's next run() starts again at round 1 with the same task ids.
        # Across incarnations the coordinator's de-duplication of results covers it.
        self.started = _RecentIds(_RECENT_TASKS)
        self.current: Message | None = None  # the task record whose handler runs now
        self.cancel_requested = False  # the running task was cancelled (Coordinator.cancel)
        self.tasks_run = 0  # by this process ([workload] max_tasks)
        self.talk = Talk(self)
        self.agent = self.talk.agent

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Announce readiness, serve until told to stop, shut down.  Returns the exit status."""
        self.pm.hook.cfn_agent_init(ctx=self.ctx)
        self.helpers = frozenset(child_pids())  # an agent-side plugin's own processes: not a handler's leftovers
        self.send_own([self.ctx.factory.make(COORDINATOR_ID, "ready", body={"pid": os.getpid()})])
        self._flush(ctx=self.ctx, reason="explicit")
        self.user.start(self)
        while True:
            self.read_inbox()
            self.run_tasks()
            self.finish_waiting()
            self.deliver_messages()
            why = self.recycle_due()  # between tasks: what is still queued goes to the successor
            if why is not None and not self.waiting:
                self.retire(why)
                break
            if self.queued:  # on_message read a task: run it before sleeping
                continue
            # checked after on_message ran: a stop it read (inside agent.receive) rings no
            # doorbell again, and what arrived before the stop was handled first
            if self.stopping and not self.waiting:
                break
            self.settle()
            self.sleep()
        self.user.stop(self)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.pm.hook.cfn_flush(ctx=self.ctx, reason="shutdown")
        if self.settled:
            self.bus.ack(self.agent_id, self.settled)
            self.settled = []
        self.pm.hook.cfn_agent_exit(ctx=self.ctx)
        kill_leftovers()  # at exit nothing this agent started stays, helpers included
        self.bus.close()

    def recycle_due(self) -> str | None:
        """Why this process should be replaced now, between tasks (``[workload] max_tasks``, ``max_rss_mb``), or None."""
        w = self.config.workload
        if w.max_tasks and self.tasks_run >= w.max_tasks:
            return f"ran max_tasks = {w.max_tasks} tasks"
        if w.max_rss_mb and self.tasks_run:
            try:
                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
            except (OSError, ValueError, IndexError):
                return None
            if rss > w.max_rss_mb:
                return f"resident memory {rss} MiB above max_rss_mb = {w.max_rss_mb}"
        return None

    def retire(self, why: str) -> None:
        """Leave for a fresh process under this id: settle what is done, say why, exit.

        Task records read but not started stay unsettled: the replacement the
        coordinator starts at once re-reads them, so no queued work is lost.
        """
        self.settle()
        self.ctx.send([self.ctx.factory.make(COORDINATOR_ID, "retiring", body={"why": why, "pid": os.getpid()})])
        self.flush()

    def send_own(self, messages: list[Message]) -> None:
        """Send the loop's own records to the coordinator (its ready, its results).

        A process agent sends them now; a hosted agent's host writes those of all its
        agents at the end of a turn of its event loop, before their acks
        (:meth:`cfn_core.host.Host.post`).  Raises MessageTooLarge here in both cases.
        """
        self.ctx.send(messages)

    def settle(self) -> None:
        """Flush what plugins buffered, then ack what is complete (in that order: see the class)."""
        self.flush()
        if self.settled:
            self.bus.ack(self.agent_id, self.settled)
            self.settled = []

    def flush(self) -> None:
        self._flush(ctx=self.ctx, reason="explicit")
        self.unflushed = False

    def sleep(self, timeout: float | None = None) -> bool:
        # no second read "in case": whatever arrived since the last read rang the doorbell
        # after it was appended (the bus's contract), so wait returns at once for it
        return self.bus.wait(self.agent_id, timeout)

    # ------------------------------------------------------------------ reading

    def read_inbox(self) -> int:
        """Read new records and :meth:`absorb` each.  Returns how many were read."""
        messages = self._read(ctx=self.ctx, agent_id=self.agent_id)
        for msg in messages:
            self.absorb(msg)
        return len(messages)

    def absorb(self, msg: Message) -> None:
        """Sort one record: queue a task, keep a peer or user message, note a stop, answer a ping."""
        self.ctx.counters["received"] += 1
        kind = msg.kind
        try:
            if kind == "task":
                self.on_task_record(msg)
            elif kind == "peer":
                self.on_peer(msg)
            elif kind == "user":
                self.talk.accept(msg)
            elif kind == "stop":
                self.stopping = True
                self.settled.append(msg.receipt)
            elif kind == "ping":
                self.on_ping(msg)
            elif kind == "cancel":
                self.on_cancel(msg)
            else:
                self.settled.append(msg.receipt)
        except (CfnError, OSError):
            raise  # the bus failed (full, removed), not the record: a replacement retries it
        except Exception as exc:  # no record may kill its agent: every replacement would re-read it
            self.reject(msg, f"{kind} record could not be handled: {describe_exception(exc)}")
            self.settled.append(msg.receipt)

    def on_task_record(self, msg: Message) -> None:
        if self.given_up(msg):
            self.settled.append(msg.receipt)  # the coordinator gave up on it (poison)
        elif not self.started.add(msg.id):
            self.ctx.counters["duplicate_tasks"] += 1  # a copy of a record already run (or running)
            self.settled.append(msg.receipt)
        else:
            self.queued.append(msg)

    def on_peer(self, msg: Message) -> None:
        if msg.round < self.newest_round:  # a late re-send of a round the coordinator has finished
            self.settled.append(msg.receipt)
        else:
            self.peers_seen[msg.round][msg.id] = msg.body
            self.held[msg.round].append(msg.receipt)

    def on_ping(self, msg: Message) -> None:
        try:
            self.ctx.route(msg.src)  # the reply's destination comes from the record: checked first
            self.ctx.send([self.ctx.factory.make(msg.src, "pong", body=msg.body)])
        except CfnError as exc:
            self.reject(msg, f"ping not answered: {exc}")
        self.settled.append(msg.receipt)

    def on_cancel(self, msg: Message) -> None:
        """``Coordinator.cancel``: drop the task if it is queued, else stop it if it runs.

        A queued task is answered at once (``"cancelled": true``); a running command's process
        group is killed (:func:`_serve_command` sees :attr:`cancel_requested`); a running Python
        handler gets :class:`~cfn_core.errors.Cancelled` at its next agent call.  A task this
        agent does not hold (finished already) needs nothing.
        """
        self.settled.append(msg.receipt)
        for queued in self.queued:
            if queued.task == msg.task and queued.round == msg.round:
                self.queued.remove(queued)
                self.settled.append(queued.receipt)
                body = {"ok": False, "value": None, "error": "cancelled", "cancelled": True, "seconds": 0.0}
                self.ctx.send([self.ctx.factory.make(COORDINATOR_ID, "result", round=msg.round, task=msg.task, body=body)])
                self.unflushed = True
                return
        current = self.current
        if current is not None and current.task == msg.task and current.round == msg.round:
            self.cancel_requested = True

    def check_cancelled(self) -> None:
        """Raise :class:`~cfn_core.errors.Cancelled` in a handler whose task was cancelled (its agent calls ask)."""
        if self.current is None:
            return
        if not self.cancel_requested:
            self.read_inbox()  # a cancel record may be waiting: the handler has not read since it began
        if self.cancel_requested:
            from .errors import Cancelled

            raise Cancelled(f"task {self.current.task} was cancelled")

    def reject(self, msg: Message, reason: str) -> None:
        """A record that cannot be acted on: dead-lettered with the reason (and settled by the caller)."""
        log.warning("%s record %s dead-lettered: %s", msg.kind, msg.id, reason)
        self.ctx.counters["dead_lettered"] += 1
        try:
            self.bus.dead_letter(self.agent_id, msg.encode(), reason)
        except (CfnError, OSError) as exc:  # a full bus: the warning above is all that is left
            log.warning("could not dead-letter record %s: %s", msg.id, exc)

    def given_up(self, msg: Message) -> bool:
        # read again for every newer round: a pooled agent outlives the run it was started in
        if self.skip_read_for is None or msg.round > self.skip_read_for:
            self.skip = read_skip_list(self.bus, self.agent_id)
            self.skip_read_for = msg.round
        return (msg.round, msg.task) in self.skip

    # ------------------------------------------------------------------ tasks

    def run_tasks(self) -> None:
        """Start the queued tasks in the order they arrived (a running one may queue more)."""
        if self.current is not None:
            return  # read from inside a handler: the loop runs them after it
        while self.queued and self.recycle_due() is None:
            self.start(self.queued.popleft())

    def finish_waiting(self) -> None:
        """Complete the mesh tasks whose expected peer messages have all arrived."""
        if not self.waiting:
            return
        still = []
        for work in self.waiting:
            if len(self.peers_seen[work.msg.round]) >= work.expect:
                self.finish(work)
            else:
                still.append(work)
        self.waiting = still

    def forget_rounds_before(self, number: int) -> None:
        # The coordinator starts a round only when every earlier one is complete, so what
        # this agent still holds of those (peer messages, a task whose peers never came)
        # is stale: settle it, or a pooled agent would count it in a later round.
        for old in [n for n in list(self.peers_seen) + list(self.held) if n < number]:
            self.peers_seen.pop(old, None)
            self.settled.extend(self.held.pop(old, ()))
        stale = [w for w in self.waiting if w.msg.round < number]
        if stale:
            self.waiting = [w for w in self.waiting if w.msg.round >= number]
            self.settled.extend(w.msg.receipt for w in stale)

    def start(self, msg: Message) -> None:
        """Begin one task: check its peers, send its peer messages, run it now or when they came."""
        if msg.round > self.newest_round:
            self.forget_rounds_before(msg.round)
            self.newest_round = msg.round
            self.talk.new_round()
        work = _Work(msg)
        if work.error is None:
            try:
                for peer in work.peers:  # before anything is sent (kept: one check per id per process)
                    self.ctx.route(peer)
            except CfnError as exc:
                work.error = f"task {msg.task}: cannot send to peer {_short(peer)}: {exc}"
        if work.error is not None:
            self.reject(msg, work.error)
            work.peers = []
            self.finish(work)
            return
        bodies: list[Any] = [None] * len(work.peers)
        scatter = self.user.scatter
        if scatter is not None and work.peers:
            try:
                bodies = list(scatter(work.payload, list(work.peers)))
                if len(bodies) != len(work.peers):
                    raise ValueError(f"scatter returned {len(bodies)} bodies for {len(work.peers)} peers")
                orjson.dumps(bodies)  # a body that is not JSON would crash the send below
            except Exception as exc:  # the peers still get their (empty) messages: nobody waits forever
                log.warning("scatter failed for task %s: %s", msg.task, describe_exception(exc))
                bodies = [None] * len(work.peers)
        if work.peers:
            self.send_peer_messages(
                work,
                [
                    # the same id when a replacement re-sends (receivers de-duplicate by it); the
                    # seq is this sender's, like that of every other message it sends
                    self.ctx.factory.make(
                        peer, "peer", round=msg.round, task=msg.task, body=bodies[i],
                        id=peer_message_id(msg.round, msg.task, i),
                    )
                    for i, peer in enumerate(work.peers)
                ],
            )
        if work.error is not None or len(self.peers_seen[msg.round]) >= work.expect:
            self.finish(work)
        else:
            self.waiting.append(work)

    def send_peer_messages(self, work: _Work, messages: list[Message]) -> None:
        """Send (and flush) a task's peer messages; a failure fails the task with the reason.

        Flushed here so that an error of a batching plugin's write surfaces now, with
        this task to charge, not in a later flush.  A body too large for the bus is sent
        empty instead (as when ``scatter`` fails): its receiver does not wait for it
        forever.  Messages sent before a failure may be sent again: receivers
        de-duplicate peer messages by id.
        """
        try:
            try:
                self.ctx.send(messages, flush=True)
            except MessageTooLarge as exc:
                work.error = f"peer message not sent: {exc}; its receiver got an empty body"
                limit = self.config.bus.max_message_bytes
                for m in messages:
                    try:
                        m.encode(limit)
                    except MessageTooLarge:
                        m.body = None
                self.ctx.send(messages, flush=True)
            self._flush(ctx=self.ctx, reason="explicit")
        except (CfnError, OSError) as exc:
            work.error = f"peer messages not sent: {describe_exception(exc) if isinstance(exc, OSError) else exc}"
            log.warning("task %s: %s", work.msg.task, work.error)

    def finish(self, work: _Work) -> None:
        """Run the task's handler (or its gather), send its result, settle what it used."""
        body, t0 = self.begin_task(work)
        try:
            if body["ok"]:
                body["value"] = self.call_handler(work)
        except Exception as exc:  # a handler that raises fails its task, not the agent
            self.handler_failed(body, exc)
        finally:
            self.current = None
            self.cancel_requested = False
        self.end_task(work, body, t0)

    def handler_failed(self, body: dict[str, Any], exc: Exception) -> None:
        """What a handler's exception makes of the task's result body (shared with hosted agents)."""
        if isinstance(exc, CommandFailed):
            body.update(ok=False, error=str(exc), stderr=exc.stderr)
            if exc.failure != "error":
                body["failure"] = exc.failure
        elif isinstance(exc, RateLimited):  # re-queued by the coordinator, not charged as an attempt
            body.update(ok=False, error=describe_exception(exc), failure="rate_limited", retry_after=exc.retry_after)
        elif self.cancel_requested:  # Cancelled at an agent call (or whatever the handler made of it)
            body.update(ok=False, error="cancelled", cancelled=True)
        else:
            body.update(ok=False, error=describe_exception(exc))

    def begin_task(self, work: _Work) -> tuple[dict[str, Any], float]:
        """Before a task's handler: the result body so far and the start time (:meth:`finish`'s first half)."""
        if self.unflushed:
            # The previous task's result goes on the bus before this handler runs: if this
            # task kills the agent, the coordinator sees that result and charges the attempt
            # to this task, not to one whose result a batching plugin still held.
            self.flush()
        t0 = time.perf_counter()
        body: dict[str, Any] = {"ok": True, "value": None, "error": None}
        self.current = work.msg
        self.cancel_requested = False
        self.talk.task_started(work.msg)
        if work.error is not None:  # it cannot run: fail it with the reason, nobody waits for it
            body.update(ok=False, error=work.error)
        return body, t0

    def call_handler(self, work: _Work) -> Any:
        if self.user.gather is not None:
            return self.user.gather(work.payload, list(self.peers_seen.get(work.msg.round, {}).values()))
        return self.user.task(work.payload, self.agent)

    def kill_leftovers(self) -> int:
        """Kill what the task left running (its processes); the number killed."""
        return kill_leftovers(self.helpers)

    def end_task(self, work: _Work, body: dict[str, Any], t0: float) -> None:
        """After a task's handler: send its result, settle what it used (:meth:`finish`'s second half)."""
        ctx = self.ctx
        msg = work.msg
        if self.talk.usage_in_task:  # agent.usage() calls, a command's cfn_usage stderr lines
            body["usage"] = self.talk.usage_in_task
        held_user = self.talk.task_finished()
        ctx.counters["leftovers_killed"] += self.kill_leftovers()  # what the task left running dies with it
        if body["ok"]:
            try:  # checked here: a send (or a batching plugin's later flush) must not crash the agent
                orjson.dumps(body["value"])
            except TypeError as exc:
                body.update(ok=False, value=None, error=f"handler returned a value that is not JSON: {exc}")
        body["seconds"] = time.perf_counter() - t0
        body["peers_received"] = len(self.peers_seen.get(msg.round, ()))
        body["peers_sent"] = len(work.peers)
        # the non-zero ones (a missing counter is 0): a plugin's histograms are mostly empty
        # buckets, and every result crosses the coordinator, the run's one serial reader
        body["counters"] = final_counters(ctx.counters)
        if ctx.fallbacks:  # the coordinator's summary lists the agents' fallbacks too
            body["fallbacks"] = list(ctx.fallbacks.values())
        result = ctx.factory.make(COORDINATOR_ID, "result", round=msg.round, task=msg.task, body=body)
        try:
            self.send_own([result])
        except CfnError as exc:  # e.g. the value is too large: report that instead
            body.update(ok=False, value=None, error=f"result not sent: {exc}")
            self.send_own([ctx.factory.make(COORDINATOR_ID, "result", round=msg.round, task=msg.task, body=body)])
        self.unflushed = True
        self.tasks_run += 1
        self.settled.append(msg.receipt)
        self.settled.extend(self.held.pop(msg.round, ()))
        self.settled.extend(held_user)  # the user messages it consumed: re-read by a replacement until now

    # ------------------------------------------------------------------ user messages while idle

    def deliver_messages(self) -> None:
        """Hand queued user messages to ``on_message`` (a class agent's), one at a time, in order."""
        if self.user.on_message is None:
            return
        while not self.queued:
            message = self.talk.next_for_handler()
            if message is None:
                return
            self.talk.handle_message(message)


def run_agent(config, pm, agent_id: str, run_ref: str, *, handler: Callable | None = None, bus=None) -> int:
    """Run one agent until it is told to stop.  Returns the exit status.

    ``handler`` is a callable ``handler(payload) -> value`` or ``handler(payload, agent)``
    (the :class:`cfn_core.agent_api.Agent` of this process, detected from its signature),
    or a class whose one instance per agent process gets ``on_start(agent)``,
    ``on_task(payload, agent)``, ``on_message(message, agent)`` and ``on_stop(agent)``.
    For mesh work it may instead (or also) have ``scatter(payload, peers) -> [body per
    peer]``, whose bodies travel in the peer messages, and ``gather(payload, bodies) ->
    value``, called with the bodies this agent received once all expected ones arrived.

    ``bus``: the run's bus, already open and listening for ``agent_id`` (a fork server
    opens it once before forking; the child calls its ``after_fork`` and ``listen``).
    Without it the agent opens its own (``cfn_bus``).
    """
    return AgentLoop(config, pm, agent_id, run_ref, handler, bus=bus).run()


def read_skip_list(bus, agent_id: str) -> set[tuple[int, str]]:
    """The ``(round, task)`` pairs the coordinator gave up on for ``agent_id``.

    Stored by the coordinator in state ``skip.<agent_id>`` as ``{"<round>": [task ids]}``:
    keyed by the session-wide round, so a task id given up on in one ``run`` is run
    again when a later ``run`` submits it.  Anything else there is ignored.
    """
    try:
        stored = json.loads(bus.get_state(f"skip.{agent_id}") or b"{}")
    except ValueError:
        return set()
    if not isinstance(stored, dict):
        return set()
    return {
        (int(number), task)
        for number, tasks in stored.items()
        if number.isascii() and number.isdigit() and isinstance(tasks, list)
        for task in tasks
        if isinstance(task, str)
    }


# ---------------------------------------------------------------------- entry point


def bootstrap_shm(run_dir: str):
    """Load the configuration a coordinator left in its run directory (shm bus)."""
    from .bus.shm import check_private_dir

    check_private_dir(run_dir)
    with open(os.path.join(run_dir, "state", "config"), "rb") as f:
        return config_from_state(f.read(), f"{run_dir}/state/config")


def config_from_state(data: bytes, source: str):
    """Rebuild the coordinator's configuration from what it stored for its agents.

    The stored document names the enabled plugins' modules, so an agent loads
    exactly those without scanning every installed distribution.
    """
    from .config import config_from_dict
    from .plugins import load_plugin, use_plugin_modules

    doc = json.loads(data)
    use_plugin_modules(doc.get("plugin_modules", {}))
    schemas = {}
    for name in doc.get("plugin_modules", {}):
        impl = getattr(load_plugin(name), "cfn_settings", None)
        if impl is not None:
            schemas.update(impl() or {})
    config = doc["config"]
    known = set(schemas) | {"workload", "bus", "run", "plugins", "agents"}
    return config_from_dict({k: v for k, v in config.items() if k in known}, source=source, plugin_schemas=schemas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.agent", description="one cfn agent process")
    parser.add_argument("--run", required=True, help="run reference (the shm run directory)")
    parser.add_argument("--id", required=True, help="agent id")
    parser.add_argument("--parent", type=int, required=True, help="pid of the coordinator; the agent dies with it")
    args = parser.parse_args(argv)
    from .process import become_subreaper, die_with_parent

    die_with_parent(args.parent)
    # the launcher started us in a process group of our own, so the terminal's Ctrl-C never
    # arrives; a SIGINT sent to this pid is the coordinator's to handle all the same
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    become_subreaper()  # what a handler orphans is adopted here, and killed after its task
    logging.basicConfig(level=logging.WARNING, format=f"cfn agent {args.id}: %(message)s")
    from .plugins import make_plugin_manager

    try:
        config = bootstrap_shm(args.run)
        pm = make_plugin_manager(config)
        return run_agent(config, pm, args.id, args.run)
    except CfnError as exc:
        print(f"cfn agent {args.id}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
