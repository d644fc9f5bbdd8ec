"""Handlers for tests/test_defects_records.py (no tests here; agents import them by name).

Every handler appends ``start <key> <pid>`` to ``payload["dir"]/log`` (see
:func:`test_faults_handlers.read_log`), so a test can count how often a task
really ran, in which processes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import _mark  # noqa: E402


class BadStr(Exception):
    """An exception whose ``str()`` raises: describing it must not kill the agent."""

    def __str__(self):
        raise RuntimeError("no text for you")


def broken_str(payload):
    """A task marked ``broken`` raises :class:`BadStr`; the others return their key."""
    _mark(payload, "start")
    if payload.get("broken"):
        raise BadStr()
    return payload["key"]


def echo_key(payload):
    """Logs the run and returns the key (a task that must run exactly once)."""
    _mark(payload, "start")
    return payload["key"]


class _Mesh:
    """Mesh handler: ``scatter`` gives each peer a body, ``gather`` counts what arrived.

    A payload marked ``big`` scatters bodies of ``big`` bytes (more than the bus takes).
    """

    def __call__(self, payload):  # not used: scatter/gather take over
        return payload["key"]

    def scatter(self, payload, peers):
        _mark(payload, "start")
        size = payload.get("big") or 8
        return ["x" * size for _ in peers]

    def gather(self, payload, bodies):
        return {"key": payload["key"], "bodies": len(bodies), "empty": sum(1 for b in bodies if b is None)}


mesh = _Mesh()


def peak_rss(payload):
    """The agent's peak resident set so far, in bytes: VmHWM, reset by exec (ru_maxrss is not)."""
    _mark(payload, "start")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
