"""Can the machine hold N more agents?  Checked before a spawn starts anything.

Each agent costs the coordinator one file descriptor (the pidfd that watches
it) and the machine one process.  Limits that matter: this process's
RLIMIT_NOFILE, the user's RLIMIT_NPROC (it counts every task of the user,
threads included), and the kernel's ``pid_max`` / ``threads-max``.  Soft
limits are raised towards the hard ones when that is enough; otherwise a
:class:`~cfn_core.ResourceLimitError` says which limit, its value, what is in
use and how to raise it.
"""

from __future__ import annotations

import os
import resource

from cfn_core import ResourceLimitError

_HEADROOM = 64


def system_tasks() -> int:
    """Tasks (processes and threads) on the machine, from /proc/loadavg."""
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[1])


def user_tasks(uid: int | None = None) -> int:
    """Tasks (threads included) whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    import psutil

    uid = os.getuid() if uid is None else uid
    count = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        info = proc.info
        if info["uids"] is not None and info["uids"].real == uid:
            count += info["num_threads"] or 1
    return count


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_limits(n: int) -> None:
    """Raise :class:`ResourceLimitError` when ``n`` more agents cannot be started."""
    from cfn_core import ensure_fd_limit, open_fd_count

    what = f"starting {n} agent(s)"
    ensure_fd_limit(open_fd_count() + n + _HEADROOM, f"{what} (one pidfd each)")

    total = system_tasks()
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and total + n + _HEADROOM > soft:
        used = user_tasks()  # only counted when the cheap bound says it could matter
        needed = used + n + _HEADROOM
        if needed > soft:
            if hard != resource.RLIM_INFINITY and needed > hard:
                raise ResourceLimitError(
                    f"{what} needs {n} more processes but this user already runs {used} of the {hard} "
                    f"that RLIMIT_NPROC allows (hard limit); raise it (ulimit -Hu, /etc/security/limits.conf) "
                    f"or start fewer agents"
                )
            resource.setrlimit(resource.RLIMIT_NPROC, (needed if hard == resource.RLIM_INFINITY else hard, hard))

    for name in ("pid_max", "threads-max"):
        limit = _read_int(f"/proc/sys/kernel/{name}")
        if limit is not None and total + n + _HEADROOM > limit:
            raise ResourceLimitError(
                f"{what} needs {n} more processes but the machine already runs {total} tasks and "
                f"kernel.{name.replace('-', '_')} = {limit}; raise it (sysctl -w kernel.{name}=...) "
                f"or start fewer agents"
            )
