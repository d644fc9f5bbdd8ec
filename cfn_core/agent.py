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

from .errors import CfnError, ConfigError, MessageTooLarge
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

    def send(self, messages: list[Message]) -> None:
        self.counters["sent"] += len(messages)
        self._send(ctx=self, messages=messages)

    def note_fallback(self, hook: str, plugin: str | None, exc: BaseException) -> None:
        from .fallback import record_fallback

        record_fallback(self, hook, plugin, exc)


# ---------------------------------------------------------------------- handlers


def load_handler(workload) -> Callable[[Any], Any]:
    """The callable that runs one task, from a role's ``handler`` or ``command``.

    :param workload: a :class:`cfn_core.roles.Role` (``roles.role_of(config, agent_id)``:
        ``[agents.<role>]`` over ``[workload]``), or the ``[workload]`` settings themselves
        (the one-role shorthand); anything with ``handler``, ``command``, ``timeout`` and
        ``directory``.
    :raises ConfigError: when the handler cannot be imported (named with the reason).
    """
    where = getattr(workload, "label", "[workload]")  # the table that set it, for the messages
    # relative names resolve against [workload] directory: by default the cfn.toml's (docs/CONFIG.md)
    directory = getattr(workload, "directory", "") or None
    if workload.command:
        return _command_handler(workload.command, workload.timeout, cwd=directory)
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
    return func


class CommandFailed(Exception):
    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


#: How a command runs.  When its agent dies (even by SIGKILL, or with its coordinator) the
#: kernel sends the shell SIGTERM (PR_SET_PDEATHSIG, set before exec), and the shell's trap
#: kills the command's whole process group: no command outlives its agent.  The command is
#: an asynchronous list so the trap runs at once (a shell runs traps only between commands),
#: with the payload on its stdin through fd 3; the shell exits with the command's status.
_GUARDED = 'exec 3<&0\ntrap "kill -KILL 0" TERM\n(\n{command}\n) <&3 3<&- &\nwait $!\n'


def _term_with_agent(agent_pid: int) -> Callable[[], None]:
    def preexec() -> None:  # in the forked child, before exec
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != agent_pid:  # the agent died before the prctl
            os._exit(1)

    return preexec


def _command_handler(command: str, timeout: float, cwd: str | None = None) -> Callable[[Any], Any]:
    script = _GUARDED.format(command=command)

    def run_command(payload: Any) -> str:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_term_with_agent(os.getpid()),
            cwd=cwd,
        )
        try:
            stdout, stderr = proc.communicate(data.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            # kill the whole process group: killing only the shell would orphan its children
            _kill_group(proc.pid)
            _stdout, stderr = proc.communicate()
            raise CommandFailed(f"command timed out after {timeout:g}s", _tail(stderr)) from None
        # The command is done, its helpers too: `server & echo ok` must not leave `server`
        # running.  Its process group (the shell's session) goes first; what left the group
        # (setsid, setpgid) was re-parented to this agent, a subreaper, and run_agent's
        # kill_leftovers after the task takes it.
        _kill_group(proc.pid)
        if proc.returncode != 0:
            tail = _tail(stderr)
            last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
            # the last stderr line in the error itself: it is what the summary shows
            why = f"command exited with status {proc.returncode}" + (f": {last[:200]}" if last else "")
            raise CommandFailed(why, tail)
        return stdout.decode("utf-8", "replace")

    return run_command


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


def run_agent(config, pm, agent_id: str, run_ref: str, *, handler: Callable | None = None) -> int:
    """Run one agent until it is told to stop.  Returns the exit status.

    ``handler`` is a callable ``handler(payload) -> value``.  For mesh work it may
    instead (or also) have ``scatter(payload, peers) -> [body per peer]``, whose
    bodies travel in the peer messages, and ``gather(payload, bodies) -> value``,
    called with the bodies this agent received once all expected ones arrived.
    """
    check_agent_id(agent_id)
    ctx = AgentContext(config, pm, agent_id, run_ref)
    ctx.bus = bus = pm.hook.cfn_bus(config=config, run_ref=run_ref)
    bus.listen(agent_id)  # bind the doorbell before the first read
    if handler is None:
        from .roles import role_of

        handler = load_handler(role_of(config, agent_id))  # its role's handler or command
    pm.hook.cfn_agent_init(ctx=ctx)
    helpers = frozenset(child_pids())  # an agent-side plugin's own processes: not a handler's leftovers
    read = direct_caller(pm, "cfn_read")
    flush = direct_caller(pm, "cfn_flush")
    ctx.send([ctx.factory.make(COORDINATOR_ID, "ready", body={"pid": os.getpid()})])
    flush(ctx=ctx, reason="explicit")

    waiting: list[_Work] = []  # mesh tasks waiting for their peer messages
    peers_seen: dict[int, dict[str, Any]] = defaultdict(dict)  # round -> peer message id -> body
    scatter = getattr(handler, "scatter", None)
    gather = getattr(handler, "gather", None)
    held: dict[int, list] = defaultdict(list)  # round -> receipts of peer messages settled with its task
    newest_round = 0  # of the tasks started so far
    skip: set[tuple[int, str]] = set()  # (round, task) the coordinator gave up on
    skip_read_for: int | None = None  # the round the skip list was last read for
    settled: list = []
    stopping = False
    unflushed = False  # a result handed to cfn_send since the last flush
    # Task records started by this incarnation, by message id: a copy of a record already
    # run (or running) is settled without running again.  Message ids, not task ids or
    # rounds: a pooled session's next run() starts again at round 1 with the same task ids.
    # Across incarnations the coordinator's de-duplication of results covers it.
    started = _RecentIds(_RECENT_TASKS)

    def reject(msg: Message, reason: str) -> None:
        """A record that cannot be acted on: dead-lettered with the reason (and settled by the caller)."""
        log.warning("%s record %s dead-lettered: %s", msg.kind, msg.id, reason)
        ctx.counters["dead_lettered"] += 1
        try:
            bus.dead_letter(agent_id, msg.encode(), reason)
        except (CfnError, OSError) as exc:  # a full bus: the warning above is all that is left
            log.warning("could not dead-letter record %s: %s", msg.id, exc)

    def finish(work: _Work) -> None:
        nonlocal unflushed
        msg = work.msg
        if unflushed:
            # The previous task's result goes on the bus before this handler runs: if this
            # task kills the agent, the coordinator sees that result and charges the attempt
            # to this task, not to one whose result a batching plugin still held.
            flush(ctx=ctx, reason="explicit")
            unflushed = False
        t0 = time.perf_counter()
        body: dict[str, Any] = {"ok": True, "value": None, "error": None}
        try:
            if work.error is not None:  # it cannot run: fail it with the reason, nobody waits for it
                body.update(ok=False, error=work.error)
            elif gather is not None:
                body["value"] = gather(work.payload, list(peers_seen.get(msg.round, {}).values()))
            else:
                body["value"] = handler(work.payload)
        except CommandFailed as exc:
            body.update(ok=False, error=str(exc), stderr=exc.stderr)
        except Exception as exc:  # a handler that raises fails its task, not the agent
            body.update(ok=False, error=describe_exception(exc))
        ctx.counters["leftovers_killed"] += kill_leftovers(helpers)  # what the task left running dies with it
        if body["ok"]:
            try:  # checked here: a send (or a batching plugin's later flush) must not crash the agent
                orjson.dumps(body["value"])
            except TypeError as exc:
                body.update(ok=False, value=None, error=f"handler returned a value that is not JSON: {exc}")
        body["seconds"] = time.perf_counter() - t0
        body["peers_received"] = len(peers_seen.get(msg.round, ()))
        body["peers_sent"] = len(work.peers)
        # the non-zero ones (a missing counter is 0): a plugin's histograms are mostly empty
        # buckets, and every result crosses the coordinator, the run's one serial reader
        body["counters"] = {k: v for k, v in ctx.counters.items() if v}
        if ctx.fallbacks:  # the coordinator's summary lists the agents' fallbacks too
            body["fallbacks"] = list(ctx.fallbacks.values())
        result = ctx.factory.make(COORDINATOR_ID, "result", round=msg.round, task=msg.task, body=body)
        try:
            ctx.send([result])
        except CfnError as exc:  # e.g. the value is too large: report that instead
            body.update(ok=False, value=None, error=f"result not sent: {exc}")
            ctx.send([ctx.factory.make(COORDINATOR_ID, "result", round=msg.round, task=msg.task, body=body)])
        unflushed = True
        settled.append(msg.receipt)
        settled.extend(held.pop(msg.round, ()))

    def given_up(msg: Message) -> bool:
        # read again for every newer round: a pooled agent outlives the run it was started in
        nonlocal skip, skip_read_for
        if skip_read_for is None or msg.round > skip_read_for:
            skip = read_skip_list(bus, agent_id)
            skip_read_for = msg.round
        return (msg.round, msg.task) in skip

    def forget_rounds_before(number: int) -> None:
        # The coordinator starts a round only when every earlier one is complete, so what
        # this agent still holds of those (peer messages, a task whose peers never came)
        # is stale: settle it, or a pooled agent would count it in a later round.
        nonlocal waiting
        for old in [n for n in list(peers_seen) + list(held) if n < number]:
            peers_seen.pop(old, None)
            settled.extend(held.pop(old, ()))
        stale = [w for w in waiting if w.msg.round < number]
        if stale:
            waiting = [w for w in waiting if w.msg.round >= number]
            settled.extend(w.msg.receipt for w in stale)

    def start(msg: Message) -> None:
        nonlocal newest_round
        if msg.round > newest_round:
            forget_rounds_before(msg.round)
            newest_round = msg.round
        work = _Work(msg)
        if work.error is None:
            try:
                for peer in work.peers:  # before anything is sent (kept: one check per id per process)
                    ctx.route(peer)
            except CfnError as exc:
                work.error = f"task {msg.task}: cannot send to peer {_short(peer)}: {exc}"
        if work.error is not None:
            reject(msg, work.error)
            work.peers = []
            finish(work)
            return
        bodies: list[Any] = [None] * len(work.peers)
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
            send_peer_messages(
                work,
                [
                    # the same id when a replacement re-sends (receivers de-duplicate by it); the
                    # seq is this sender's, like that of every other message it sends
                    ctx.factory.make(
                        peer, "peer", round=msg.round, task=msg.task, body=bodies[i],
                        id=peer_message_id(msg.round, msg.task, i),
                    )
                    for i, peer in enumerate(work.peers)
                ],
            )
        if work.error is not None or len(peers_seen[msg.round]) >= work.expect:
            finish(work)
        else:
            waiting.append(work)

    def send_peer_messages(work: _Work, messages: list[Message]) -> None:
        """Send (and flush) a task's peer messages; a failure fails the task with the reason.

        Flushed here so that an error of a batching plugin's write surfaces now, with
        this task to charge, not in a later flush.  A body too large for the bus is sent
        empty instead (as when ``scatter`` fails): its receiver does not wait for it
        forever.  Messages sent before a failure may be sent again: receivers
        de-duplicate peer messages by id.
        """
        try:
            try:
                ctx.send(messages)
            except MessageTooLarge as exc:
                work.error = f"peer message not sent: {exc}; its receiver got an empty body"
                limit = config.bus.max_message_bytes
                for m in messages:
                    try:
                        m.encode(limit)
                    except MessageTooLarge:
                        m.body = None
                ctx.send(messages)
            flush(ctx=ctx, reason="explicit")
        except (CfnError, OSError) as exc:
            work.error = f"peer messages not sent: {describe_exception(exc) if isinstance(exc, OSError) else exc}"
            log.warning("task %s: %s", work.msg.task, work.error)

    while True:
        messages = read(ctx=ctx, agent_id=agent_id)
        for msg in messages:
            ctx.counters["received"] += 1
            kind = msg.kind
            try:
                if kind == "task":
                    if given_up(msg):
                        settled.append(msg.receipt)  # the coordinator gave up on it (poison)
                    elif not started.add(msg.id):
                        ctx.counters["duplicate_tasks"] += 1  # a copy of a record already run (or running)
                        settled.append(msg.receipt)
                    else:
                        start(msg)
                elif kind == "peer":
                    if msg.round < newest_round:  # a late re-send of a round the coordinator has finished
                        settled.append(msg.receipt)
                    else:
                        peers_seen[msg.round][msg.id] = msg.body
                        held[msg.round].append(msg.receipt)
                elif kind == "stop":
                    stopping = True
                    settled.append(msg.receipt)
                elif kind == "ping":
                    try:
                        ctx.route(msg.src)  # the reply's destination comes from the record: checked first
                        ctx.send([ctx.factory.make(msg.src, "pong", body=msg.body)])
                    except CfnError as exc:
                        reject(msg, f"ping not answered: {exc}")
                    settled.append(msg.receipt)
                else:
                    settled.append(msg.receipt)
            except (CfnError, OSError):
                raise  # the bus failed (full, removed), not the record: a replacement retries it
            except Exception as exc:  # no record may kill its agent: every replacement would re-read it
                reject(msg, f"{kind} record could not be handled: {describe_exception(exc)}")
                settled.append(msg.receipt)
        if waiting:
            still = []
            for work in waiting:
                if len(peers_seen[work.msg.round]) >= work.expect:
                    finish(work)
                else:
                    still.append(work)
            waiting = still
        if stopping and not waiting:
            break
        flush(ctx=ctx, reason="explicit")
        unflushed = False
        if settled:
            bus.ack(agent_id, settled)
            settled = []
        # no second read "in case": whatever arrived since this read rang the doorbell
        # after it was appended (the bus's contract), so wait returns at once for it
        bus.wait(agent_id, None)

    pm.hook.cfn_flush(ctx=ctx, reason="shutdown")
    if settled:
        bus.ack(agent_id, settled)
    pm.hook.cfn_agent_exit(ctx=ctx)
    kill_leftovers()  # at exit nothing this agent started stays, helpers included
    bus.close()
    return 0


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
