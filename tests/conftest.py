"""Shared fixtures: every test must leave no agent process, no run directory and no fd behind."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest


def _runs(root: Path) -> set[str]:
    return {p.name for p in root.glob("cfn-*")}


@pytest.fixture
def bus_root(tmp_path_factory):
    """A private bus root for one test, so parallel tests never see each other's runs."""
    root = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path_factory.getbasetemp()
    d = root / f"cfntest-{os.getpid()}-{os.urandom(4).hex()}"
    d.mkdir(mode=0o700)
    yield d
    leftovers = _runs(d)
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    assert not leftovers, f"run directories left behind: {leftovers}"


@pytest.fixture
def no_leaks():
    """Assert the test leaves no child process and no extra open fd."""
    me = psutil.Process()
    fds_before = me.num_fds()
    yield
    children = me.children(recursive=True)
    assert not children, f"processes left behind: {[(c.pid, c.cmdline()) for c in children]}"
    assert me.num_fds() <= fds_before, f"fds leaked: {me.num_fds() - fds_before}"


@pytest.fixture
def make_config(bus_root):
    """Build a validated config whose bus lives under this test's private root."""
    from cfn_core.config import config_from_dict

    def make(plugins=(), **tables):
        data = {"plugins": list(plugins)}
        data.update({k: dict(v) for k, v in tables.items()})
        data.setdefault("bus", {})["root"] = str(bus_root)
        return config_from_dict(data)

    return make
