"""A task handler for the kill tests: SIGKILLs its own agent the first time it sees a marker path."""

from __future__ import annotations

import os
import signal


def die_once(payload):
    if isinstance(payload, dict) and payload.get("die_once"):
        try:
            fd = os.open(payload["die_once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return "survived"
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return payload
