"""The flusher thread cannot die silently: counted, unbatched meanwhile, restarted."""

from __future__ import annotations

import time


def test_dead_flusher_is_counted_bypassed_and_restarted(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=50, timeout_ms=50) as (bus, batcher, counters):
        first = batcher.thread
        batcher.restart_delay = 3600.0  # keep it down long enough to observe the unbatched mode
        with batcher.lock:
            batcher.fault = RuntimeError("injected")
            batcher.cond.notify_all()
        first.join(30)
        assert not first.is_alive()
        assert counters["batch.flusher_deaths"] == 1
        # while it is down, sends go out at once (no flush, no timer needed)
        batcher.send(bh.make_messages("s", ["a", "a", "b"]))
        assert len(bh.received(bus, "a")) == 2 and len(bh.received(bus, "b")) == 1
        assert counters["batch.unbatched_messages"] == 3
        assert counters["batch.flush.unbatched"] == 3
        # once the back-off has passed the next send restarts it, and batching resumes
        batcher.restart_at = time.monotonic() - 1
        batcher._last_send = time.monotonic()  # continues a burst: buffered, so a flusher is needed again
        batcher.send(bh.make_messages("t", ["a"]))
        assert batcher.thread is not first and batcher.thread.is_alive()
        assert counters["batch.flusher_restarts"] == 1
        assert counters["batch.unbatched_messages"] == 3  # this one was buffered again
        bus.listen("a")
        got = []
        while not got:
            bus.wait("a", 1.0)
            got = bh.received(bus, "a")
        assert [m.src for m in got] == ["t"]
        bh.until_counted(counters, "batch.flush.timeout", 1)
        assert counters["batch.flush.timeout"] == 1  # delivered by the restarted flusher


def test_flusher_and_sender_share_the_bus_safely(bus_root, bh):
    # a 1 ms timeout keeps the flusher writing while the main thread sends: all arrive, in order
    with bh.batcher_on_bus(bus_root, size=20, max_size=20, adaptive=False, timeout_ms=1) as (bus, batcher, counters):
        plan = ["a", "b", "c", "d"] * 1500
        msgs = bh.make_messages("s", plan)
        for i in range(0, len(msgs), 3):
            batcher.send(msgs[i : i + 3])
        batcher.flush("explicit")
        for dst in "abcd":
            assert [m.id for m in bh.received(bus, dst)] == [m.id for m in msgs if m.dst == dst]
        assert counters["batch.messages"] == 6000
