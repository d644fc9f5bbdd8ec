"""Repository-wide test policy: the default run stays quick, CI runs everything.

Tests marked ``slow`` (500-agent fault runs, every-plugin parametrizations) are
deselected on a developer's machine unless ``--run-slow`` is given; with
``CI=true`` they always run, so nothing is hidden from CI.  Selecting them
explicitly with ``-m slow`` also runs them.
"""

from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (always on with CI=true)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("CI", "").lower() == "true":
        return
    if "slow" in (config.getoption("-m") or "").replace("not slow", ""):
        return
    kept, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept
