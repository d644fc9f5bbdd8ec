"""OS-level helpers for agent processes: parent-death signal, pidfds, resource limits.

And the three pieces that keep processes from outliving their run
(docs/RELIABILITY.md, "No process outlives its agent"):

* :func:`start_process` starts an agent (or a zygote) from a thread that lives
  as long as this process, in a process group of its own;
* :func:`become_subreaper` and :func:`kill_leftovers`: an agent adopts whatever
  its handler orphaned and kills it after every task and at exit;
* :class:`Janitor`: one small process per session that kills every process
  carrying the run's marker (``CFN_RUN``) once the coordinator is gone, even
  after a SIGKILL, when no agent was left to clean up.
"""

from __future__ import annotations

import _signal
import ctypes
import math
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from .errors import ResourceLimitError

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = None

#: The environment variable that marks every process of a run (agents, the zygote and
#: everything they start): its value is the run reference.  The janitor kills by it.
RUN_MARKER = "CFN_RUN"


def _prctl(option: int, arg: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl(option, arg, 0, 0, 0)


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (PR_SET_PDEATHSIG).

    The check after the call closes the race where the parent died before it:
    then we are already re-parented and exit at once.

    The kernel sends the signal when the *thread* that forked this process
    exits, not the process; so the parent must fork from a thread that lasts
    (:func:`start_process` does).
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(0)


# ---------------------------------------------------------------------- starting agents


class _LastingThread:
    """One daemon thread, never ended, that runs the calls handed to it (see :func:`start_process`)."""

    def __init__(self) -> None:
        import queue  # here: agents import this module and never need them

        self._calls = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="cfn-launcher", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            func, args, kwargs, future = self._calls.get()
            try:
                future.set_result(func(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller; this thread must not end
                future.set_exception(exc)

    def call(self, func, *args, **kwargs):
        from concurrent.futures import Future

        future = Future()
        self._calls.put((func, args, kwargs, future))
        return future.result()


_lasting: _LastingThread | None = None
_lasting_lock = threading.Lock()


def _forget_lasting_thread() -> None:  # a forked child has no threads but the one that forked
    global _lasting, _lasting_lock
    _lasting = None
    _lasting_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_lasting_thread)


def in_lasting_thread(func, *args, **kwargs):
    """``func(*args, **kwargs)`` called from a thread that lives as long as this process.

    ``PR_SET_PDEATHSIG`` fires when the thread that forked a child exits: a
    session opened from a worker thread would lose every agent it started
    when that thread ended.  The main thread lasts as long as the process
    (Python keeps it until the other threads are joined), so calls from it run
    in place; calls from any other thread are handed to one daemon thread,
    started on first use and never ended, and the caller waits for the result.
    """
    global _lasting
    me = threading.current_thread()
    if me is threading.main_thread() or (_lasting is not None and me is _lasting.thread):
        return func(*args, **kwargs)
    with _lasting_lock:
        if _lasting is None:
            _lasting = _LastingThread()
    return _lasting.call(func, *args, **kwargs)


def start_process(cmd: list[str], *, run_ref: str | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start an agent process (or a zygote) as ``subprocess.Popen(cmd, **popen_kwargs)`` would, except:

    * it is forked from a thread that lasts as long as this process
      (:func:`in_lasting_thread`), so its ``PR_SET_PDEATHSIG`` ties it to this
      process, not to the thread that happened to ask;
    * it runs in a process group of its own (``setpgid`` before exec), so the
      terminal's Ctrl-C (SIGINT to the foreground process group) never reaches
      it, not even while its interpreter starts: Ctrl-C is the coordinator's to
      handle, and the agent dies with it.  A group, not a session (``setsid``):
      with the kernel's scheduler autogroups (one per session) a session would
      also change how the CPU is shared between the coordinator and its agents,
      which the benchmarks measure;
    * with ``run_ref``, its environment carries ``CFN_RUN=<run_ref>``, inherited
      by everything it starts, so the run's :class:`Janitor` finds them.
    """
    if not popen_kwargs.get("start_new_session"):
        popen_kwargs.setdefault("process_group", 0)
    if run_ref is not None:
        popen_kwargs["env"] = dict(popen_kwargs.get("env") or os.environ, **{RUN_MARKER: run_ref})
    return in_lasting_thread(subprocess.Popen, cmd, **popen_kwargs)


# ---------------------------------------------------------------------- what a handler leaves behind


def become_subreaper() -> None:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER).

    A process a handler started and then left (fork-and-return, a shell's
    ``cmd &``, a double fork, ``setsid``) is re-parented to the nearest living
    subreaper ancestor instead of pid 1: to this agent, which
    :func:`kill_leftovers` then finds among its children.
    """
    global _subreaper_pid
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _subreaper_pid = os.getpid()  # not inherited by fork: a forked child is not one until it says so


_subreaper_pid: int | None = None


def _has_children() -> bool:
    """Whether this process has any child, running or a zombie (one system call, nothing reaped)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def child_pids() -> set[int]:
    """Pids of this process's children (running or zombies)."""
    if not _has_children():
        return set()
    import psutil

    try:
        return {p.pid for p in psutil.Process().children()}
    except psutil.Error:
        return set()


def kill_leftovers(keep: frozenset[int] | set[int] = frozenset(), timeout: float = 5.0) -> int:
    """SIGKILL every descendant of this process except ``keep`` and theirs; reap them.  Returns how many.

    For a subreaper (:func:`become_subreaper`): then every process it started,
    directly or not, that is still running is a child or a child's descendant.
    Killed processes' own children are re-parented here and killed in the
    next pass, until none is left (or ``timeout``).  Costs one system call when
    there is no child at all.  Never raises.  Does nothing in a process that did
    not call :func:`become_subreaper` (``run_agent`` called in some other program
    must not kill that program's children).
    """
    if _subreaper_pid != os.getpid() or (not keep and not _has_children()):
        return 0
    import psutil

    me = psutil.Process()
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            victims = []
            for child in me.children():
                if child.pid in keep:
                    continue
                victims.append(child)
                try:
                    victims += child.children(recursive=True)
                except psutil.Error:
                    pass
            if not victims:
                break
            for proc in victims:
                try:
                    running = proc.status() != psutil.STATUS_ZOMBIE
                    os.kill(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, psutil.Error):
                    continue
                if running:
                    killed.add(proc.pid)
            _reap(victims, deadline)
    except psutil.Error:  # this process's own entry unreadable: nothing more to do
        pass
    return len(killed)


def _reap(victims, deadline: float) -> None:
    """Wait for SIGKILLed ``victims`` to die, reaping those that are (or became) our children."""
    import psutil

    pending = {p.pid for p in victims}
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    pending.discard(pid)
            except ChildProcessError:  # not (yet) our child: gone, or its parent reaps it
                if not psutil.pid_exists(pid):
                    pending.discard(pid)
        if pending:
            time.sleep(0.002)  # SIGKILLed processes end within milliseconds; re-parented ones show up here


#: The janitor's whole program: no import beyond the standard library's, so it starts in milliseconds.
_JANITOR = r"""
import os, signal, sys, time
marker, me = ("%s=" + sys.argv[1]).encode(), os.getpid()
sys.stdin.buffer.read()  # end of file: the coordinator closed its session, or died
deadline = time.monotonic() + 10.0
while time.monotonic() < deadline:
    found = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/" + name + "/environ", "rb") as f:
                environ = f.read()  # a zombie's is empty: a killed process is not found twice
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            try:
                os.kill(int(name), signal.SIGKILL)
                found += 1
            except OSError:
                pass
    if not found:
        break
    time.sleep(0.005)  # let the killed ones' children show themselves
""" % RUN_MARKER

_close_in_children: set[int] = set()


def _close_inherited() -> None:
    for fd in _close_in_children:  # a forked child (a relay) must not keep the janitor waiting
        try:
            os.close(fd)
        except OSError:
            pass
    _close_in_children.clear()


os.register_at_fork(after_in_child=_close_inherited)


class Janitor:
    """Kills every process of a run once its coordinator is gone, however it went.

    Agents die with their coordinator (``PR_SET_PDEATHSIG``), but a SIGKILLed
    agent cannot kill what its handler started, and those would be adopted by
    pid 1.  Everything an agent starts inherits ``CFN_RUN=<run_ref>`` from its
    environment (:func:`start_process`), so one process per session can find
    them: it waits for end of file on a pipe only the coordinator holds, which
    comes when the session closes or the coordinator dies (even by SIGKILL),
    then SIGKILLs every process of this user whose environment carries the
    marker, until none is left.  It has no parent-death signal, so it outlives
    the coordinator for those milliseconds.  What escapes it: a process that
    removed the marker from its environment (``env -i``, ``execve`` with its
    own environment) *and* was orphaned by an agent's SIGKILL.
    """

    def __init__(self, run_ref: str):
        read_end, self._write_end = os.pipe()
        _close_in_children.add(self._write_end)
        try:
            self.proc = start_process(
                [sys.executable, "-I", "-S", "-c", _JANITOR, run_ref],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # no terminal's hangup may stop it before it has swept
            )
        except BaseException:
            self._close_pipe()
            raise
        finally:
            os.close(read_end)

    def _close_pipe(self) -> None:
        if self._write_end is not None:
            _close_in_children.discard(self._write_end)
            os.close(self._write_end)
            self._write_end = None

    def sweep(self) -> None:
        """Let it sweep now (end of file), without waiting: :meth:`close` waits.  Idempotent.

        For a coordinator whose agents are all gone: it can remove the run directory
        while the janitor reads ``/proc`` (tens of milliseconds on a busy machine).
        """
        self._close_pipe()

    def close(self, timeout: float = 15.0) -> None:
        """Let it sweep (end of file) and wait for it; kill it if it does not finish in ``timeout``."""
        self._close_pipe()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
_deferring = False


@contextmanager
def interrupts_deferred():
    """Run the block whole: a SIGINT or SIGTERM that arrives meanwhile is handled when it ends.

    For the few steps an interrupt must not split: starting an agent and
    recording its handle (else nobody stops it), making the run directory and
    keeping its name (else nobody removes it), and closing.  The signal's own
    handler runs afterwards as it would have (the CLI's raises; the default
    SIGINT handler raises KeyboardInterrupt; ``SIG_DFL`` terminates).  A
    handler set outside Python (``signal.getsignal`` gives None) could not be
    put back, so that signal is not deferred.

    A signal mask is not enough: the kernel hands a signal blocked by the main
    thread to any other thread (a metrics server, a batch flusher), and
    Python then runs the handler in the main thread anyway.  So the handlers
    are swapped for one that only notes the signal.  Handlers can only be set
    in the main thread; elsewhere this does nothing (the handler raises in the
    main thread, not in this one).  Nested blocks defer to the outermost.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    # a handler not set from Python (getsignal: None) could not be put back: left alone.
    # _signal's functions, not signal's: these run around every agent launch, and signal's
    # wrappers convert every number to and from an enum (4 us a call; 0.3 us without)
    swap = [sig for sig in _INTERRUPTS if _signal.getsignal(sig) is not None]
    note = arrived.append
    previous = {sig: _signal.signal(sig, lambda signum, frame: note(signum)) for sig in swap}
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for sig, handler in previous.items():
            _signal.signal(sig, handler)
        if arrived:
            _handle_late(arrived[0], previous[arrived[0]])


def _handle_late(signum: int, handler) -> None:
    """What ``handler`` would have done with ``signum`` when it arrived."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action, now that the default handler is back


def wait_readable(objs, timeout: float | None = None) -> list:
    """Those of ``objs`` (descriptors, or objects with ``fileno()``) that are readable within ``timeout`` seconds.

    ``select.select`` with a timeout, but with ``poll(2)``: ``select(2)`` cannot
    watch a descriptor numbered 1024 or more, and a coordinator holding a pidfd
    per agent (or a program with many files open) gets such numbers for what it
    opens next (a pool's zygote sockets, host pidfds, a relay's pidfd).  End of
    file, a hang-up and an error count as readable, as they do for select.
    ``timeout`` None waits; 0 polls.
    """
    poller = select.poll()
    by_fd = {}
    for obj in objs:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN)  # POLLHUP and POLLERR are reported whatever is asked
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [by_fd[fd] for fd, _ in poller.poll(ms) if fd in by_fd]


def pidfd_open(pid: int) -> int | None:
    """A pidfd (readable once ``pid`` exits), or None when the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def ensure_fd_limit(needed: int, what: str) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards the hard limit so ``needed`` fds fit.

    :raises ResourceLimitError: when even the hard limit is too low, before anything is started.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(max(needed, soft), hard)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ResourceLimitError(
            f"{what} needs about {needed} open files but this process may only open {hard} "
            f"(RLIMIT_NOFILE hard limit); raise it (ulimit -Hn, /etc/security/limits.conf) or use fewer agents"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def ensure_fds_for_agents(count: int, what: str) -> int:
    """:func:`ensure_fd_limit` for a process that will hold ``count`` agents at once.

    Each agent costs the coordinator about three descriptors (its pidfd, its inbox and its
    cursor); 256 more cover the bus, the metrics server and the plugins.  A plugin that
    starts agents beyond ``[workload] agents`` (a pool's pre-spawn) checks its own count.
    """
    return ensure_fd_limit(3 * count + 256, what)


def open_fd_count() -> int:
    """File descriptors this process holds (for leak checks)."""
    return len(os.listdir("/proc/self/fd"))
