"""The flusher thread delivers a buffered message without any explicit flush; a send after a pause waits for nothing."""

from __future__ import annotations

import time


def test_a_send_after_a_pause_is_written_during_the_call(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=50, timeout_ms=600_000, start=False) as (bus, batcher, counters):
        first = bh.make_messages("s", ["a", "b", "a"])
        batcher.send(first)  # nothing sent before: this starts a burst
        assert batcher.buffers == {}
        assert [m.id for m in bh.received(bus, "a")] == [first[0].id, first[2].id]
        assert counters["batch.flush.leading"] == 2  # one write per destination
        assert counters["batch.latency_le.0"] == 3  # three messages that waited <= 0.1 ms
        assert batcher.thread is None  # nothing stayed buffered: no flusher thread was needed
        second = bh.make_messages("s", ["a"])
        batcher.send(second)  # right after: continues the burst, buffered, and now a flusher runs
        assert len(batcher.buffers["a"]) == 1
        assert batcher.thread is not None and batcher.thread.is_alive()


def test_lone_message_is_delivered_by_the_timeout_flush(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=50, timeout_ms=100) as (bus, batcher, counters):
        bus.listen("a")  # the doorbell rings when the flusher writes
        batcher._last_send = time.monotonic()  # as if a send just happened: this one continues a burst
        batcher.send(bh.make_messages("s", ["a"]))
        got = []
        for _ in range(100):  # generous: up to 100 s on a loaded machine, normally one wake-up
            if bus.wait("a", 1.0):
                got = bh.received(bus, "a")
                if got:
                    break
        assert len(got) == 1
        bh.until_counted(counters, "batch.flush.timeout", 1)
        assert counters["batch.flush.timeout"] == 1
        assert counters.get("batch.flush.explicit", 0) == 0
        # the flusher sends a buffer once its oldest record waited half the timeout
        assert counters["batch.latency_max_us"] >= 50_000 * 0.5


def test_flusher_parks_without_a_timer_and_wakes_for_the_next_record(bus_root, bh):
    with bh.batcher_on_bus(bus_root, timeout_ms=20) as (bus, batcher, counters):
        bus.listen("a")
        for round_ in range(3):
            # nothing buffered: the flusher parks in an untimed wait (idle agents cost no wake-ups)
            deadline = time.monotonic() + 60
            while not batcher.idle and time.monotonic() < deadline:
                time.sleep(0.001)
            assert batcher.idle
            batcher._last_send = time.monotonic()  # continues a burst: buffered, not written in the call
            batcher.send(bh.make_messages("s", ["a"]))  # the first record wakes it
            while not bus.wait("a", 1.0):
                pass
            assert len(bh.received(bus, "a")) == 1
            bh.until_counted(counters, "batch.flush.timeout", round_ + 1)
        assert counters["batch.flush.timeout"] == 3
