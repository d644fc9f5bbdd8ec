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


def install_dist(site, dist: str, entry_points: dict[str, str], *, modules: dict[str, str] | None = None,
                 version: str = "0.1") -> Path:
    """Install a distribution into the directory ``site`` the way pip leaves one behind.

    A ``<dist>-<version>.dist-info`` with ``METADATA`` and an ``entry_points.txt`` whose
    group ``cfn`` maps each plugin name to its module (``{"tracer": "cfn_tracer"}``), and
    each module of ``modules`` (``{name: source}``) as ``<name>.py``.  Put ``site`` on
    ``sys.path`` / ``PYTHONPATH`` (and clear ``cfn_core.plugins.installed``'s cache in a
    process that has scanned the entry points already): cfn then finds the plugins like
    any installed one, in this process and in the agents it starts.  Returns the
    dist-info directory.
    """
    import textwrap

    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[cfn]\n" + "".join(f"{n} = {v}\n" for n, v in entry_points.items()))
    return info
