"""The zygote: a pre-warmed process that forks ready-to-run agents.

Started once per session by the coordinator as a fresh interpreter::

    python -m cfn_pool.zygote --run RUN_DIR --parent COORDINATOR_PID --fd N

It dies with the coordinator (``PR_SET_PDEATHSIG``), loads the run's
configuration, builds the plugin manager, imports every role's handler (one
role, the workload's, without ``[agents.<role>]`` tables; a forked agent runs
the handler of the role its id names) and
everything the agent loop uses, opens the run's bus for the agents to adopt
(:func:`open_bus_for_forks`), runs the loop once over trivial tasks
(:func:`warm_up`), freezes the heap (``gc.freeze``: forked
children then share those pages instead of copying them when the collector
would touch them), says ``R`` and serves requests on the socket ``fd``.

The protocol is one ASCII line per message, so requests can be pipelined:

=====================  ===============================================
coordinator -> zygote  ``F <agent_id>``  fork an agent with that id
                       ``S <pid>``       exit status of a child that ended
zygote -> coordinator  ``R <pid>``       ready to fork (the forker's pid)
                       ``P <agent_id> <pid>``  forked
                       ``E <agent_id> <reason>``  could not fork
                       ``X <pid> <status>``  exit status (``?`` if unknown)
=====================  ===============================================

End of file on the socket means "shut down": the zygote kills any child still
running (the coordinator has already stopped them), reaps them and exits.
Every forked child calls ``die_with_parent(zygote)``, so no agent outlives the
zygote and no zygote outlives the coordinator.

:class:`Zygote` is the coordinator's side of the socket.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict

# bound here, not imported in each forked agent (see _agent_child)
from cfn_core import CfnError, become_subreaper, die_with_parent, run_agent, start_process, wait_readable

_MAX_STATUSES = 20_000


class ZygoteError(RuntimeError):
    """The zygote could not be started or stopped answering."""


# ---------------------------------------------------------------------- coordinator side


class Zygote:
    """The coordinator's handle on one zygote process and its forkers.

    :param forkers: fork servers: the zygote itself plus ``forkers - 1`` copies
        it forks of itself once warm.  Forking is the spawn bottleneck (a fork
        of a ~20 MB interpreter costs milliseconds of page-table copying), so
        several forkers use several CPUs.  Requests are spread round robin.
    """

    def __init__(self, run_ref: str, *, start_timeout: float, forkers: int = 1):
        t0 = time.perf_counter()
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(max(1, forkers))]
        cmd = [sys.executable, "-m", "cfn_pool.zygote", "--run", run_ref, "--parent", str(os.getpid())]
        for _, theirs in pairs:
            cmd += ["--fd", str(theirs.fileno())]
        try:
            # agents' stdout goes to our stderr, like the baseline launcher's; start_process: from a
            # thread that lasts (PR_SET_PDEATHSIG follows the forking thread: a session opened from
            # a worker thread would lose the zygote, and every agent, when that thread ends), in a
            # process group of its own (the terminal's Ctrl-C never reaches the zygote or its agents),
            # marked with CFN_RUN for the run's janitor
            self.proc = start_process(
                cmd,
                run_ref=run_ref,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),
                pass_fds=[theirs.fileno() for _, theirs in pairs],
            )
        finally:
            for _, theirs in pairs:
                theirs.close()
        self.socks: list[socket.socket | None] = [ours for ours, _ in pairs]
        self.pid = self.proc.pid
        self._bufs = [b""] * len(self.socks)
        self._next = 0
        self._forked: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._statuses: dict[int, int | None] = {}
        self._owner: dict[int, int] = {}  # agent pid -> index of the forker that forked it
        self._ready = 0
        self.forker_pids: list[int] = []
        self._requested: set[str] = set()  # fork requests sent and not taken yet
        self._sent_to: dict[str, int] = {}  # agent id -> forker asked to fork it (until it answers)
        try:
            self._wait(lambda: self._ready >= len(self.socks), start_timeout, "to start")
        except BaseException:
            self.close(1.0)
            raise
        self.start_seconds = time.perf_counter() - t0

    @property
    def alive(self) -> bool:
        """The zygote runs and at least one forker answers (a dead forker is skipped)."""
        return any(s is not None for s in self.socks) and self.proc.poll() is None

    @property
    def outstanding(self) -> int:
        return len(self._requested)

    def requested(self, agent_id: str) -> bool:
        return agent_id in self._requested

    def request(self, agent_ids) -> None:
        """Ask for forks without waiting (pipelined; :meth:`take` collects each pid)."""
        ids = [a for a in agent_ids if a not in self._requested]
        while ids:
            live = [i for i, sock in enumerate(self.socks) if sock is not None]
            if not live:
                raise ZygoteError(f"the zygote (pid {self.pid}) has no forker left")
            per: dict[int, list[str]] = {i: [] for i in live}
            for agent_id in ids:
                self._next += 1
                per[live[self._next % len(live)]].append(agent_id)
            ids = []
            for i, chunk in per.items():
                if not chunk:
                    continue
                try:
                    self.socks[i].sendall("".join(f"F {a}\n" for a in chunk).encode())
                except OSError:  # this forker is gone: ask the others
                    self._forker_gone(i)
                    ids += chunk
                    continue
                for agent_id in chunk:
                    self._sent_to[agent_id] = i
                self._requested.update(chunk)

    def _forker_gone(self, i: int) -> None:
        sock = self.socks[i]
        if sock is not None:
            sock.close()
            self.socks[i] = None
        for agent_id, j in list(self._sent_to.items()):
            if j == i:  # asked and never answered
                del self._sent_to[agent_id]
                self._errors[agent_id] = "its forker exited"

    def take(self, agent_id: str, timeout: float = 10.0) -> int:
        """The pid forked for ``agent_id`` (requesting it now unless it was requested ahead)."""
        self.request([agent_id])
        try:
            self._wait(lambda: agent_id in self._forked or agent_id in self._errors, timeout, f"to fork {agent_id}")
        finally:
            self._requested.discard(agent_id)
        if agent_id in self._errors:
            raise ZygoteError(f"the zygote could not fork {agent_id}: {self._errors.pop(agent_id)}")
        return self._forked.pop(agent_id)

    def cancel_unclaimed(self, timeout: float = 5.0) -> int:
        """Kill agents forked ahead that nobody took (the spawn ended without them)."""
        killed = 0
        deadline = time.monotonic() + timeout
        while self._requested and time.monotonic() < deadline:
            for agent_id in list(self._requested):
                pid = self._forked.pop(agent_id, None)
                if pid is not None or self._errors.pop(agent_id, None) is not None:
                    self._requested.discard(agent_id)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)  # a forker's child: the forker reaps it
                    except ProcessLookupError:
                        pass
                    killed += 1
            if self._requested and not self._pump(max(0.0, deadline - time.monotonic())):
                break
        return killed

    def exit_status(self, pid: int, timeout: float = 1.0) -> int | None:
        """Exit status of a child that has ended (negative: killed by that signal), None if unknown."""
        i = self._owner.pop(pid, None)
        if i is None:
            return None
        try:
            self._send(i, f"S {pid}\n")
            self._wait(lambda: pid in self._statuses, timeout, f"to report pid {pid}")
        except ZygoteError:
            return None
        return self._statuses.pop(pid)

    def close(self, timeout: float) -> None:
        """Shut the zygote down (end of file on its sockets), kill it if it does not exit in time."""
        for i, sock in enumerate(self.socks):
            if sock is not None:
                sock.close()
                self.socks[i] = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its forkers and agents die with it (PR_SET_PDEATHSIG)
            self.proc.wait()

    # ------------------------------------------------------------------ the sockets

    def _send(self, i: int, text: str) -> None:
        sock = self.socks[i]
        if sock is None:
            raise ZygoteError("the zygote is closed")
        try:
            sock.sendall(text.encode())
        except OSError as exc:
            self._forker_gone(i)
            raise ZygoteError(f"a forker of the zygote (pid {self.pid}) is gone: {exc}") from None

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZygoteError(f"the zygote (pid {self.pid}) took more than {timeout:g}s {what}")
            if not self._pump(remaining) and not self.alive:
                raise ZygoteError(f"the zygote (pid {self.pid}) exited with status {self.proc.poll()}")

    def _pump(self, timeout: float) -> bool:
        """Read and parse what the forkers sent; False on timeout or end of file."""
        socks = [s for s in self.socks if s is not None]
        if not socks:
            return False
        ready = wait_readable(socks, timeout)  # poll(2): a coordinator's descriptors may be numbered over 1024
        got = False
        for sock in ready:
            i = self.socks.index(sock)
            try:
                data = sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:  # this forker is gone: what it was asked and did not answer fails
                self._forker_gone(i)
                continue
            got = True
            lines = (self._bufs[i] + data).split(b"\n")
            self._bufs[i] = lines.pop()
            for line in lines:
                kind, _, rest = line.decode().partition(" ")
                if kind == "P":
                    agent_id, _, pid = rest.partition(" ")
                    self._sent_to.pop(agent_id, None)
                    self._forked[agent_id] = int(pid)
                    self._owner[int(pid)] = i
                elif kind == "E":
                    agent_id, _, reason = rest.partition(" ")
                    self._sent_to.pop(agent_id, None)
                    self._errors[agent_id] = reason
                elif kind == "X":
                    pid, _, status = rest.partition(" ")
                    self._statuses[int(pid)] = None if status == "?" else int(status)
                elif kind == "R":
                    self._ready += 1
                    self.forker_pids.append(int(rest))
        return got


# ---------------------------------------------------------------------- zygote side


class _ProcessFormatter(logging.Formatter):
    """Log lines that say which process wrote them: ``cfn zygote: ...``, then ``cfn agent ID: ...`` in an agent.

    Installed once in the zygote; a forked agent only renames it.  Building a
    Formatter in every agent cost ~60 copy-on-write page faults of the zygote's heap.
    """

    who = "cfn zygote"

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.who}: {super().format(record)}"


_FORMATTER = _ProcessFormatter("%(message)s")


def _agent_child(agent_id: str, run_ref: str, config, pm, handler, zygote_pid: int, control: list, bus=None) -> None:
    """In the forked child: become agent ``agent_id`` and never return.

    Everything here runs once per agent, in a copy of the zygote: every page of the
    zygote's heap it writes (a reference count is enough) is copied for this agent,
    at several microseconds a page.  So it imports nothing, builds nothing and
    closes the forker's sockets by descriptor (their objects are never used again).
    """
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for obj in control:  # the forker's control socket and wake-up pipe are not the agent's
            os.close(obj.detach() if isinstance(obj, socket.socket) else obj)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(zygote_pid)
        become_subreaper()  # not inherited through fork: what its handler orphans is the agent's to kill
        if _sched_batch(config) and hasattr(os, "SCHED_BATCH"):
            # a woken agent does not preempt the coordinator in the middle of a burst of sends
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        gc.enable()
        _FORMATTER.who = f"cfn agent {agent_id}"
        try:
            if bus is not None:
                bus.after_fork()
                bus.listen(agent_id)
            code = run_agent(config, pm, agent_id, run_ref, handler=handler, bus=bus)
        except CfnError as exc:
            print(f"cfn agent {agent_id}: {exc}", file=sys.stderr)
            code = 3
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _sched_batch(config) -> bool:
    try:
        return bool(config.section("pool").sched_batch)
    except KeyError:
        return False


def serve(sock: socket.socket, run_ref: str, config, pm, handlers, keep: frozenset[int] = frozenset(), bus=None) -> None:
    """Fork agents on request until the socket reaches end of file.

    ``handlers``: ``{role: handler}``, every role's handler imported once, here; an
    agent gets the one of its role (``cfn_core.role_of``: the role its id names).

    The forker is a subreaper: when one of its agents dies by a signal (the
    coordinator's SIGKILL of a hung agent, a crash), what that agent's handler
    had started is adopted here, and killed at once.  ``keep``: other children
    that are not agents (the main zygote's forkers), waited for at the end.
    """
    from cfn_core import become_subreaper, kill_leftovers, role_of

    become_subreaper()
    me = os.getpid()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    statuses: OrderedDict[int, int] = OrderedDict()
    control = [sock, wake_r, wake_w]

    def reap() -> None:
        orphaned = False  # an agent that did not exit cleanly could not kill what its handler left
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                children.discard(pid)
                orphaned = orphaned or status != 0
            statuses[pid] = os.waitstatus_to_exitcode(status)
            if len(statuses) > _MAX_STATUSES:
                statuses.popitem(last=False)
        if orphaned:
            kill_leftovers(keep=children | keep)

    sock.sendall(f"R {me}\n".encode())
    buf = b""
    while True:
        try:
            readable, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            try:
                while os.read(wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            reap()
        if sock not in readable:
            continue
        data = sock.recv(1 << 16)
        if not data:
            break
        lines = (buf + data).split(b"\n")
        buf = lines.pop()
        out = []
        for line in lines:
            kind, _, arg = line.decode().partition(" ")
            if kind == "F":
                try:
                    pid = os.fork()
                except OSError as exc:
                    out.append(f"E {arg} fork failed: {exc.strerror}\n")
                    continue
                if pid == 0:
                    _agent_child(arg, run_ref, config, pm, handlers[role_of(config, arg).name], me, control, bus)
                children.add(pid)
                out.append(f"P {arg} {pid}\n")
            elif kind == "S":
                pid = int(arg)
                if pid not in statuses and pid in children:
                    try:  # the coordinator saw it end: it is a zombie, this does not block for long
                        _, status = os.waitpid(pid, 0)
                        children.discard(pid)
                        statuses[pid] = os.waitstatus_to_exitcode(status)
                        if status != 0:  # reaped here, not in reap(): its leftovers die here too
                            kill_leftovers(keep=children | keep)
                    except ChildProcessError:
                        children.discard(pid)
                status = statuses.pop(pid, None)
                out.append(f"X {pid} {'?' if status is None else status}\n")
        if out:
            sock.sendall("".join(out).encode())
    # shutdown: the coordinator has stopped its agents; make sure, then reap
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for pid in list(children) + list(keep):  # the other forkers see end of file on their sockets too
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    # whatever the killed agents' handlers had started (and, here, what the forkers left, adopted by
    # this subreaper): with no child to keep, one system call finds there is none, where keeping the
    # forkers meant listing every process of the machine (psutil), 30-100 ms on a busy one
    kill_leftovers()


#: trivial tasks the warm-up agent runs before the zygote forks anything
WARM_UP_TASKS = 20


def _echo(payload):
    """The warm-up agent's handler: the kernel's path is what is warmed, not a handler."""
    return payload


def warm_up(config, run_ref: str, tasks: int = WARM_UP_TASKS) -> int:
    """Run the kernel's agent loop over ``tasks`` trivial tasks on a scratch bus, in this process.

    Python 3.11+ specializes ("quickens") bytecode the first times it runs and
    allocates the caches and objects a path needs on first use.  Done here,
    before any fork, every agent inherits that instead of each doing it in its
    own copy-on-write memory: measured on 500 agents, ~7% less CPU from fork to
    ready, ~10% less private memory per agent, and a first task ~20% quicker
    (docs/plugins/pool.md).

    Only the kernel runs: the warm-up agent uses a plugin manager with the
    builtins alone and a handler that returns its payload, so no plugin hook and
    no user handler ever sees an agent that is not the run's.  The scratch bus is
    a run directory of its own inside ``run_ref`` (the run's directory), removed
    at once, and with the run if this process is killed before.  A failure is logged and
    ignored: warming up is an optimization, never a reason not to fork.
    Returns the number of tasks the warm-up agent answered (0 when skipped).
    """
    from cfn_core import COORDINATOR_ID, MessageFactory, ShmBus, builtin_plugin_manager, run_agent

    bus = None
    try:
        pm = builtin_plugin_manager()
        # inside the run directory: if the zygote is killed half way, the run's removal takes it
        bus = ShmBus.create(run_ref, inbox_depth=config.bus.inbox_depth)
        agent_id = "warm-up"
        route = pm.hook.cfn_route
        location = route(agent_id=agent_id, config=config)
        make = MessageFactory(COORDINATOR_ID).make
        body = {"payload": "x", "peers": [], "expect": 0}
        records = [make(agent_id, "task", round=1, task=f"w{i}", body=body).encode() for i in range(tasks)]
        for record in records:  # one write each, as the coordinator's sends arrive
            bus.deliver(agent_id, location, [record])
        bus.deliver(agent_id, location, [make(agent_id, "stop").encode()])
        run_agent(config, pm, agent_id, os.fspath(bus.run_dir), handler=_echo)
        answers = bus.read(COORDINATOR_ID, route(agent_id=COORDINATOR_ID, config=config))
        return len(answers) - 1  # the results, not the "ready"
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger("cfn.pool").info("zygote warm-up skipped: %s: %s", type(exc).__name__, exc)
        return 0
    finally:
        if bus is not None:
            bus.destroy()


def open_bus_for_forks(pm, config, run_ref: str):
    """The run's bus opened here, once, for every forked agent to adopt, or None.

    A forked agent calls the object's ``after_fork`` (it forgets every descriptor
    the object held, so no two processes share an inbox's open file and its flock)
    and ``listen``, instead of building its own through ``cfn_bus``: the objects
    are already in the zygote's memory, which saves each agent the copied pages of
    building them (measured: ~25 fewer page faults per agent, ~4% of a pooled
    agent's, fork to exit; docs/plugins/pool.md).  A bus without ``after_fork`` is
    closed again: each agent then opens its own.
    """
    bus = pm.hook.cfn_bus(config=config, run_ref=run_ref)
    if not callable(getattr(bus, "after_fork", None)):
        bus.close()
        return None
    return bus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_pool.zygote", description="cfn-pool's fork server")
    parser.add_argument("--run", required=True, help="run reference (the shm run directory)")
    parser.add_argument("--parent", type=int, required=True, help="coordinator pid; the zygote dies with it")
    parser.add_argument(
        "--fd", type=int, action="append", required=True, help="a control socket from the coordinator (one per forker)"
    )
    args = parser.parse_args(argv)
    from cfn_core import die_with_parent

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setFormatter(_FORMATTER)  # "cfn zygote: ...", renamed in each agent
    socks = [socket.socket(fileno=fd) for fd in args.fd]
    try:
        # importing these loads the agent loop, the bus and the messages (and everything they
        # import) here, once, before any fork, instead of in every agent
        from cfn_core import MessageFactory, ShmBus, bootstrap_shm, load_handler, make_plugin_manager, roles_of, run_agent  # noqa: F401

        config = bootstrap_shm(args.run)
        pm = make_plugin_manager(config)
        handlers = {name: load_handler(role) for name, role in roles_of(config).items()}
        bus = open_bus_for_forks(pm, config, args.run)
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which falls back
        print(f"cfn zygote: cannot prepare agents: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    warm_up(config, args.run)
    for h in logging.getLogger().handlers:  # the handler module's too: the agents' lines say whose they are
        h.setFormatter(_FORMATTER)
    gc.collect()
    gc.freeze()  # children share the warm heap instead of copying pages the collector would touch
    me = os.getpid()
    forkers = []
    for i, sock in enumerate(socks[1:], 1):
        pid = os.fork()
        if pid == 0:  # a forker: the same warm image, serving its own socket
            code = 0
            try:
                for j, other in enumerate(socks):
                    if j != i:
                        other.close()
                die_with_parent(me)
                serve(sock, args.run, config, pm, handlers, bus=bus)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        forkers.append(pid)
        sock.close()
    serve(socks[0], args.run, config, pm, handlers, keep=frozenset(forkers), bus=bus)  # waits for the forkers at the end
    return 0


if __name__ == "__main__":
    sys.exit(main())
