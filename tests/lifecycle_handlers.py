"""Handlers for tests/test_defects_lifecycle.py (no tests here): handlers that leave processes behind.

Agents import them by name (``lifecycle_handlers:leave_children``); the test puts this
directory on their PYTHONPATH.  ``$CFN_LIFECYCLE_DIR`` names a scratch directory: every
process a handler leaves behind creates an empty file ``<kind>-<pid>`` there *before*
the handler returns (a pipe says so), so the test knows each pid for certain and can
check that it is gone.  Nothing here sleeps to synchronize; the leftovers sleep
because that is what a forgotten helper does.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time


def _note(kind: str, pid: int) -> None:
    open(os.path.join(os.environ["CFN_LIFECYCLE_DIR"], f"{kind}-{pid}"), "x").close()


def _linger(kind: str, ready_w: int) -> None:
    """In a forked child: say who we are, then outlive the handler (never return into the agent)."""
    try:
        _note(kind, os.getpid())
        os.write(ready_w, b"x")
        time.sleep(300)
    finally:
        os._exit(0)


def _fork_lingering(kind: str, double: bool) -> None:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        if double:  # fork-and-return: the middle process exits at once, its child is orphaned
            if os.fork() == 0:
                _linger(kind, ready_w)
            os._exit(0)
        _linger(kind, ready_w)
    os.close(ready_w)
    os.read(ready_r, 1)  # the child (or grandchild) wrote its file
    os.close(ready_r)
    if double:
        os.waitpid(pid, 0)


def leave_children(payload):
    """Leave three processes: a forked child, an orphaned grandchild (double fork) and a
    ``setsid`` program that left the agent's session.  With ``$CFN_LIFECYCLE_HANG`` set,
    hang afterwards (so the agent is still busy when its coordinator is SIGKILLed)."""
    _fork_lingering("fork", double=False)
    _fork_lingering("double", double=True)
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    _note("setsid", sleeper.pid)
    if os.environ.get("CFN_LIFECYCLE_HANG"):
        threading.Event().wait()
    return "left three behind"
