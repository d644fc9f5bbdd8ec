"""A handler whose agents start slowly once a task has hung: the replacement of a killed agent.

Imported by agents (a fresh interpreter on the baseline imports it before it is ready).
When ``$CFN_TEST_SLOW_START`` names a directory holding ``hung``, the import takes
``SLOW_START`` seconds, which is what a replacement's start-up can take on a loaded
machine.  The sleep stands for slow work, not for synchronization.
"""

from __future__ import annotations

import os
import time

#: longer than the tests' [workload] timeout: a start-up that slow must not count against a task
SLOW_START = 3.0

_scratch = os.environ.get("CFN_TEST_SLOW_START")
if _scratch and os.path.exists(os.path.join(_scratch, "hung")):
    time.sleep(SLOW_START)


def hang_once(payload):
    """The task marked ``hang`` hangs on its first attempt only (it leaves ``hung`` behind)."""
    marker = os.path.join(payload["dir"], "hung")
    with open(os.path.join(payload["dir"], "log"), "a") as f:
        f.write(f"start {payload['key']} {os.getpid()}\n")
    if payload.get("hang") and not os.path.exists(marker):
        open(marker, "w").close()
        while True:
            time.sleep(3600)
    return payload["key"]
