"""Handlers for tests/test_roles.py (no tests here): one per role, each saying who ran it.

Agents import them by name (``roles_handlers:plan``) from ``[workload] directory``, which
the tests set to this directory.
"""

from __future__ import annotations

import os


def plan(payload):
    return {"by": "plan", "payload": payload, "pid": os.getpid()}


def code(payload):
    return {"by": "code", "payload": payload, "pid": os.getpid()}


def review(payload):
    return {"by": "review", "payload": payload, "pid": os.getpid()}


def crash(payload):
    """Kill the agent (no result): the coordinator charges the task an attempt."""
    os._exit(7)
