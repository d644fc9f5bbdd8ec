"""Handlers for cfn-pool's tests, imported by the zygote and its agents.

The ``pool_env`` fixture puts this directory on the agents' PYTHONPATH.  A
handler learns what to do from its payload, ``{"key": "t1", "dir": "/tmp/x",
"hang": true}``; files it writes in ``dir`` tell the test what happened.
Nothing here sleeps to synchronize: a hang is a wait that never ends.
"""

from __future__ import annotations

import os
import threading


def hang_once(payload):
    """The first attempt of a ``hang`` task writes its pid to ``<key>.started`` and never returns;
    the next attempt (a replacement agent) returns the key."""
    marker = os.path.join(payload["dir"], f"{payload['key']}.started")
    if payload.get("hang") and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        threading.Event().wait()
    with open(os.path.join(payload["dir"], f"{payload['key']}.done.{os.getpid()}"), "w"):
        pass
    return payload["key"]


def whoami(payload):
    """The pid of the agent that ran the task."""
    return os.getpid()


def record_call(payload):
    """Append one line per call, whatever the payload, to the file named by ``$CFN_TEST_CALLS``."""
    with open(os.environ["CFN_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()} {payload!r}\n")
    return payload


def log_warning(payload):
    """Log one warning through the root logger (the zygote's handler, as the agent formats it)."""
    import logging

    logging.getLogger("pool-test").warning("handler says %s", payload)
    return payload
