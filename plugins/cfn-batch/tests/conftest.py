"""Shared helpers of the cfn-batch tests: a real ShmBus and a Batcher on it."""

from __future__ import annotations

import time
from contextlib import contextmanager

from cfn_core.bus.shm import ShmBus
from cfn_core.messages import MessageFactory, decode

from cfn_batch import BatchSettings, Batcher
from cfn_batch.stats import BatchStats


def route(agent_id: str) -> str:
    return f"inbox/{agent_id}"


@contextmanager
def batcher_on_bus(bus_root, start=True, **settings):
    bus = ShmBus.create(str(bus_root))
    counters: dict = {}
    s = BatchSettings(**settings)
    batcher = Batcher(bus, route, s, 1 << 20, BatchStats(counters, min(s.size, s.max_size)))
    if start:
        batcher.start()
    try:
        yield bus, batcher, counters
    finally:
        batcher.close()
        bus.destroy()


def received(bus, dst: str) -> list:
    """Every message now in ``dst``'s inbox, decoded, in inbox order."""
    return [decode(raw) for raw, _ in bus.read(dst, route(dst))]


def until_counted(counters: dict, key: str, value: int, timeout: float = 60.0) -> None:
    """Wait for the flusher to count what it wrote: it counts once its write returned,
    just after the reader's doorbell rang, so the reader can be there first."""
    deadline = time.monotonic() + timeout
    while counters.get(key, 0) < value and time.monotonic() < deadline:
        time.sleep(0.001)


def make_messages(sender: str, plan: list[str]) -> list:
    factory = MessageFactory(sender)
    return [factory.make(dst, "peer", body={"i": i}) for i, dst in enumerate(plan)]


import sys

import pytest


@pytest.fixture
def bh():
    """These helpers (tests cannot import a conftest under --import-mode=importlib)."""
    return sys.modules[__name__]
