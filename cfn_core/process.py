"""OS-level helpers for agent processes: parent-death signal, pidfds, resource limits."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading
from contextlib import contextmanager

from .errors import ResourceLimitError

_PR_SET_PDEATHSIG = 1
_libc = None


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (PR_SET_PDEATHSIG).

    The check after the call closes the race where the parent died before it:
    then we are already re-parented and exit at once.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(0)


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
    # a handler not set from Python (getsignal: None) could not be put back: left alone
    swap = [sig for sig in _INTERRUPTS if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in swap}
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            _handle_late(arrived[0], previous[arrived[0]])


def _handle_late(signum: int, handler) -> None:
    """What ``handler`` would have done with ``signum`` when it arrived."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action, now that the default handler is back


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
