"""A full buffer is written by its sender; nothing is ever dropped."""

from __future__ import annotations

import pytest
from cfn_core import BusError


def test_buffer_never_exceeds_max_size(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=5, max_size=5, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        for msg in bh.make_messages("s", ["a"] * 23):  # one message per call: the first starts a burst, the rest buffer
            batcher.send([msg])
            assert len(batcher.buffers.get("a", [])) < 5
        assert counters["batch.flush.leading"] == 1
        assert len(batcher.buffers["a"]) == 2
        assert len(bh.received(bus, "a")) == 21
        assert counters["batch.flush.size"] == 4


def test_a_large_send_that_starts_a_burst_is_written_in_the_call(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=5, max_size=5, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        early = bh.make_messages("s", ["b", "a", "b"])
        batcher.send(early[:1])  # starts a burst: written at once
        batcher.send(early[1:])  # continues it: buffered
        assert counters["batch.flush.leading"] == 1 and sum(map(len, batcher.buffers.values())) == 2
        batcher._last_send = float("-inf")  # as if the last send were long ago: the next call starts a burst
        bulk = bh.make_messages("t", ["a"] * 12 + ["b"] * 2 + ["c"])
        batcher.send(bulk)  # every group written now, none left buffered
        assert batcher.buffers == {}
        got = {d: bh.received(bus, d) for d in "abc"}
        # each destination: what was written or buffered first, then the call's group, in order
        assert [m.id for m in got["a"]] == [early[1].id] + [m.id for m in bulk if m.dst == "a"]
        assert [m.id for m in got["b"]] == [early[0].id, early[2].id] + [m.id for m in bulk if m.dst == "b"]
        assert len(got["c"]) == 1
        # a: 13 records in writes of at most max_size (5, 5, 3); b and c one write each
        assert counters["batch.flush.leading"] == 1 + 5 and counters["batch.batches"] == 6


def test_large_sends_that_continue_a_stream_are_buffered(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=5, max_size=50, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        first = bh.make_messages("s", ["a", "b", "c"] * 2)
        batcher.send(first)  # starts a burst: written at once (groups of 2)
        assert counters["batch.flush.leading"] == 3
        second = bh.make_messages("t", ["a", "b", "c"] * 2)
        batcher.send(second)  # right after: buffered, to coalesce with what follows
        assert sum(len(b) for b in batcher.buffers.values()) == 6
        batcher.flush("explicit")
        for d in "abc":
            assert [m.id for m in bh.received(bus, d)] == [m.id for m in first + second if m.dst == d]


def test_a_leading_write_that_fails_keeps_every_record(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=3, max_size=4, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        real = bus.deliver

        def full(dst, location, records):
            raise BusError("bus is full (test)")

        bus.deliver = full
        msgs = bh.make_messages("s", ["a"] * 10 + ["b"] * 2)
        with pytest.raises(BusError):
            batcher.send(msgs)
        assert [len(batcher.buffers[d]) for d in "ab"] == [10, 2]  # all kept
        bus.deliver = real
        batcher.flush("explicit")
        for d in "ab":
            assert [m.id for m in bh.received(bus, d)] == [m.id for m in msgs if m.dst == d]


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
