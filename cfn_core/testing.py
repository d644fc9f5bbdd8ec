"""Fixtures for testing cfn and cfn plugins, served by cfn's pytest plugin.

Every test that starts agents should use ``make_config`` (a private bus root,
checked empty afterwards) and ``no_leaks`` (no child process, no extra fd).
Plugin authors get them for free: installing cfn-core registers the pytest plugin.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def bus_root(tmp_path_factory):
    """A private bus root for one test; fails the test if a run directory is left in it."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path_factory.getbasetemp()
    root = base / f"cfntest-{os.urandom(5).hex()}"
    root.mkdir(mode=0o700)
    yield root
    leftovers = sorted(p.name for p in root.iterdir())
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"left behind in the bus root: {leftovers}"


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a child process or an open file descriptor behind."""
    import psutil

    me = psutil.Process()
    fds_before = me.num_fds()
    yield
    children = me.children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    assert not children, f"processes left behind: {[c.pid for c in children]}"
    assert me.num_fds() <= fds_before, f"{me.num_fds() - fds_before} file descriptor(s) leaked"


@pytest.fixture
def make_config(bus_root):
    """``make_config(plugins=("pool",), workload={"agents": 5})`` -> a validated Config on ``bus_root``."""
    from cfn_core.config import config_from_dict

    def make(plugins=(), **tables):
        data = {"plugins": list(plugins)}
        data.update({k: dict(v) for k, v in tables.items()})
        data.setdefault("bus", {}).setdefault("root", str(bus_root))
        return config_from_dict(data)

    return make


def wait_for(predicate, what: str, timeout: float = 90.0) -> None:
    """Poll a condition that another process makes true (not a sleep-as-synchronization).

    :raises AssertionError: naming ``what`` when it is still false after ``timeout`` seconds
        (generous by default: the machine may be loaded, and the wait is not what is tested).
    """
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
