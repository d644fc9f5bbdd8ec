"""A full buffer is written by its sender; nothing is ever dropped."""

from __future__ import annotations

import pytest
from cfn_core import BusError


def test_buffer_never_exceeds_max_size(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=5, max_size=5, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        batcher.send(bh.make_messages("s", ["a"] * 23))
        assert len(batcher.buffers["a"]) == 3
        assert len(bh.received(bus, "a")) == 20
        assert counters["batch.flush.size"] == 4


def test_failed_write_keeps_the_batch_and_raises(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=4, max_size=4, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        real = bus.deliver
        calls = []

        def full(dst, location, records):
            calls.append(len(records))
            raise BusError("bus is full (test)")

        bus.deliver = full
        with pytest.raises(BusError):
            batcher.send(bh.make_messages("s", ["a"] * 4))
        assert len(batcher.buffers["a"]) == 4  # kept, in order, at the head
        bus.deliver = real
        batcher.send(bh.make_messages("t", ["a"] * 2))
        batcher.flush("explicit")
        got = bh.received(bus, "a")
        assert [m.src for m in got] == ["s"] * 4 + ["t"] * 2
        assert [m.seq for m in got[:4]] == [1, 2, 3, 4]
