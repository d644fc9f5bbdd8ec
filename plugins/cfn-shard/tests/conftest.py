"""Fixtures of the cfn-shard tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def probe_handler(monkeypatch):
    """Make ``shard_probe_handler:where`` importable in the coordinator and in agents."""
    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return "shard_probe_handler:where"
