"""Handlers for tests/test_events.py and tests/test_top.py (no tests here).

Agents import them by name (``watch_handlers:mixed``); the tests put this directory on
their PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def mixed(payload):
    """``{"do": "ok"}`` returns, ``{"do": "fail"}`` raises, ``{"do": "die", "marker": path}``
    SIGKILLs its own agent on the first attempt (the marker file says it was made).  Once
    the file ``payload["hold"]`` exists, every task sleeps until its agent is stopped."""
    if payload.get("hold") and os.path.exists(payload["hold"]):
        time.sleep(3600)
    do = payload.get("do")
    if do == "fail":
        raise ValueError("asked to fail")
    if do == "die":
        try:
            open(payload["marker"], "x").close()
        except FileExistsError:
            return "second attempt"
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok"


def slow(payload):
    """Sleeps ``$CFN_WATCH_SLOW`` seconds (default an hour): a task that outlasts any start-up,
    however loaded the machine (500 agents took over 2 minutes to start in CI); the tests stop the run."""
    time.sleep(float(os.environ.get("CFN_WATCH_SLOW", "3600")))
    return "slept"


def modules(payload):
    """The modules of a watching concern this agent process has loaded (none, expected)."""
    return sorted(m for m in sys.modules if m == "rich" or m.startswith("rich.") or m == "cfn_core.top")
