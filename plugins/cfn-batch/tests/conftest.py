"""Shared helpers of the cfn-batch tests: a real ShmBus and a Batcher on it."""

from __future__ import annotations

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


def make_messages(sender: str, plan: list[str]) -> list:
    factory = MessageFactory(sender)
    return [factory.make(dst, "peer", body={"i": i}) for i, dst in enumerate(plan)]


import sys

import pytest


@pytest.fixture
def bh():
    """These helpers (tests cannot import a conftest under --import-mode=importlib)."""
    return sys.modules[__name__]
