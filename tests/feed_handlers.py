"""Handlers of tests/test_feed*.py (imported by the agents from this directory)."""

from __future__ import annotations

import os
import time


def _mark(path: str) -> None:
    """Write this process's pid to ``path`` whole: the test waits for the file to exist and
    reads it at once (a file opened and not yet written was read empty once in CI)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _started(payload) -> None:
    # appended, one line per handler (tests count them): a test waits for whole lines
    if isinstance(payload, dict) and payload.get("started"):
        with open(payload["started"], "a") as fh:  # the test waits for it: the handler runs now
            fh.write(f"{os.getpid()}\n")


def gate(payload):
    """Mark it started, wait until the file ``payload["gate"]`` exists, return ``payload["value"]``."""
    _started(payload)
    deadline = time.monotonic() + 120
    while not os.path.exists(payload["gate"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.01)
    return payload.get("value")


def pid(payload):
    """The agent process's pid (and the payload): which agent ran it."""
    return [os.getpid(), payload]


def maybe_fail(payload):
    """Fail on ``"boom"``, else return the payload."""
    if payload == "boom":
        raise ValueError("boom was asked for")
    return payload


def echo_inputs(payload):
    """Return the payload as the agent got it (with ``after``: ``{"payload", "after"}``)."""
    return payload


def cooperative(payload, agent):
    """Report a status until cancelled: the status call raises Cancelled."""
    _started(payload)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        agent.status("working")
        time.sleep(0.02)
    return "never cancelled"


def stubborn(payload):
    """Never calls the agent: a cancel can only kill its agent (after the grace period)."""
    _started(payload)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return "never cancelled"


def step_agent(payload, agent):
    """:func:`step`, and a ``{"wait": path}`` payload reports a status until cancelled."""
    inner = payload.get("payload") if isinstance(payload, dict) and "after" in payload else payload
    if isinstance(inner, dict) and inner.get("wait"):
        _mark(inner["wait"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            agent.status("waiting to be cancelled")
            time.sleep(0.02)
        return "never cancelled"
    if inner == "boom":
        raise ValueError("boom was asked for")
    return payload
