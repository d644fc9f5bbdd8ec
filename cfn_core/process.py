"""OS-level helpers for agent processes: parent-death signal, pidfds, resource limits."""

from __future__ import annotations

import ctypes
import os
import resource
import signal

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


def open_fd_count() -> int:
    """File descriptors this process holds (for leak checks)."""
    return len(os.listdir("/proc/self/fd"))
