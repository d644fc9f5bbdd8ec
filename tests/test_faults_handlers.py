"""Handlers and helpers shared by the fault, limit and security tests (no tests here).

Agents import the handlers below by name (``test_faults_handlers:kill_once``),
so the fixture ``fault_env`` puts this directory on the agents' PYTHONPATH.  A
handler learns what to do from its task's payload, a dict such as
``{"key": "t7", "dir": "/tmp/x", "kill": true}``; the files it leaves in
``dir`` tell the test what really happened inside the agents (attempts made,
processes killed).  Nothing here sleeps to synchronize: a "hang" is a handler
that never returns, a "crash" is ``SIGKILL`` sent by the agent to itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZATIONS = ("pool", "parallel", "batch", "shard")


def installed_optimizations() -> list[str]:
    from cfn_core.plugins import installed

    have = installed()
    return [name for name in OPTIMIZATIONS if name in have]


def plugin_sets(single: bool = False) -> list[tuple[str, ...]]:
    """The baseline, (each installed optimization alone,) and all of them together."""
    have = installed_optimizations()
    sets: list[tuple[str, ...]] = [()]
    if single:
        sets += [(name,) for name in have]
    if have and (not single or len(have) > 1):
        sets.append(tuple(have))
    return sets


def plugin_params():
    """pytest params: the baseline and all plugins by default, each plugin alone marked ``slow``."""
    import pytest

    out = [pytest.param(p, id=set_id(p)) for p in plugin_sets()]
    out += [pytest.param((name,), id=name, marks=pytest.mark.slow) for name in installed_optimizations()]
    return out


def set_id(plugins: tuple[str, ...]) -> str:
    return "+".join(plugins) or "baseline"


def _mark(payload, what: str) -> None:
    """Append one line ``<what> <key> <pid>`` to ``dir/log`` (O_APPEND: whole lines)."""
    line = f"{what} {payload['key']} {os.getpid()}\n".encode()
    fd = os.open(os.path.join(payload["dir"], "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_log(directory) -> list[tuple[str, str, int]]:
    path = os.path.join(directory, "log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(w, k, int(p)) for w, k, p in (line.split() for line in f if line.strip())]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


def kill_once(payload):
    """Work ``payload["work"]`` seconds, then: a task marked ``kill`` SIGKILLs its
    agent the first time it runs (an O_EXCL marker file remembers), and succeeds after."""
    _mark(payload, "start")
    if payload.get("work"):
        time.sleep(payload["work"])  # simulated work, not synchronization
    if payload.get("kill"):
        try:
            fd = os.open(os.path.join(payload["dir"], f"killed-{payload['key']}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            _mark(payload, "kill")
            _die()
    return payload["key"]


def hang_by_claim(_payload):
    """For `cfn run` (whose payloads are filler): take the next unclaimed payload of the JSON
    list in $CFN_TEST_PAYLOADS (an O_EXCL claim file per index) and run :func:`hang` on it."""
    import json

    path = os.environ["CFN_TEST_PAYLOADS"]
    with open(path) as f:
        payloads = json.load(f)
    for i, payload in enumerate(payloads):
        try:
            os.close(os.open(f"{path}.claim-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return hang(payload)
    raise RuntimeError("no payload left to claim")


def poison(payload):
    """A task marked ``poison`` SIGKILLs every agent that runs it."""
    _mark(payload, "start")
    if payload.get("poison"):
        _die()
    return payload["key"]


def hang(payload):
    """A task marked ``hang`` never returns (its agent is killed by the watchdog)."""
    _mark(payload, "start")
    if payload.get("hang"):
        while True:
            time.sleep(3600)
    return payload["key"]


def raise_on(payload):
    """A task marked ``raise`` raises: an error result, the agent lives on."""
    _mark(payload, "start")
    if payload.get("raise"):
        raise RuntimeError(f"task {payload['key']} refuses")
    return payload["key"]


def grow(payload):
    """A result four times the size of the payload (fills a small bus on the way back)."""
    return payload * 4


def whoami(payload):
    """The agent's pid and the modules it has imported that the test planted."""
    planted = sorted(m for m in sys.modules if m.startswith("cfn_planted"))
    return {"pid": os.getpid(), "planted": planted, "key": payload.get("key") if isinstance(payload, dict) else None}


# ---------------------------------------------------------------------- fixtures


if "pytest" in sys.modules:  # in the test process only: agents import this module without pytest
    import pytest

    @pytest.fixture
    def fault_env(monkeypatch, tmp_path):
        """Make this directory importable by the coordinator and every agent; returns a scratch dir."""
        monkeypatch.syspath_prepend(HERE)
        monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        scratch = tmp_path / "faults"
        scratch.mkdir()
        return scratch


def agent_processes(root_pid: int | None = None) -> list:
    """Live descendants of this process (or ``root_pid``)."""
    import psutil

    try:
        proc = psutil.Process(root_pid or os.getpid())
        return [p for p in proc.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []
