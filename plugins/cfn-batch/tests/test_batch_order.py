"""Per-destination batches keep send order, whatever triggered the flush."""

from __future__ import annotations

import random



def test_interleaved_destinations_keep_send_order_per_destination(bus_root, bh):
    rng = random.Random(7)
    plan = [rng.choice(["a", "b", "c"]) for _ in range(500)]
    with bh.batcher_on_bus(bus_root, size=7, max_size=7, adaptive=False, timeout_ms=600_000) as (bus, batcher, counters):
        msgs = bh.make_messages("s", plan)
        for start in range(0, len(msgs), 5):  # calls smaller than size (those are buffered), as a program makes them
            batcher.send(msgs[start : start + 5])
        batcher.flush("explicit")
        for dst in "abc":
            got = bh.received(bus, dst)
            want = [m for m in msgs if m.dst == dst]
            assert [m.id for m in got] == [m.id for m in want]
            assert [m.seq for m in got] == sorted(m.seq for m in got)
    # the first call started a burst (written at once, one write per destination); size
    # flushes carried most of the rest, explicit the remainders
    first, rest = plan[:5], plan[5:]
    assert counters["batch.flush.leading"] == len(set(first))
    assert counters["batch.flush.size"] == sum(rest.count(d) // 7 for d in "abc")
    assert counters["batch.flush.explicit"] == sum(1 for d in "abc" if rest.count(d) % 7)
    assert counters["batch.messages"] == 500


def test_one_write_per_destination_per_flush(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=1000, max_size=1000, timeout_ms=600_000) as (bus, batcher, counters):
        batcher.send(bh.make_messages("s", ["z"]))  # starts a burst: written at once
        batcher.send(bh.make_messages("s", ["a", "b"] * 40 + ["c"]))  # continues it: buffered
        assert bus.read("a", "inbox/a") == []  # nothing written before the flush
        batcher.flush("explicit")
        assert counters["batch.batches"] == 1 + 3
        assert counters["batch.messages_le.5"] == 2  # two batches of 40 (bucket <= 50)
        assert counters["batch.messages_le.0"] == 2  # two of 1 (z and c)
        assert len(bh.received(bus, "a")) == 40


def test_two_senders_each_keep_their_order_in_a_shared_inbox(bus_root, bh):
    with bh.batcher_on_bus(bus_root, size=5, max_size=5, adaptive=False, timeout_ms=600_000) as (bus, one, _):
        from cfn_batch import BatchSettings, Batcher
        from cfn_batch.stats import BatchStats

        other = Batcher(bus, bh.route, BatchSettings(size=3, max_size=3, adaptive=False), 1 << 20, BatchStats({}, 3))
        other.start()
        try:
            a, b = bh.make_messages("x", ["d"] * 50), bh.make_messages("y", ["d"] * 50)
            for i in range(0, 50, 4):
                one.send(a[i : i + 4])
                other.send(b[i : i + 4])
            one.flush("explicit")
            other.flush("explicit")
        finally:
            other.close()
        got = bh.received(bus, "d")
        assert len(got) == 100
        for sender, sent in (("x", a), ("y", b)):
            assert [m.id for m in got if m.src == sender] == [m.id for m in sent]


def test_a_send_the_caller_flushes_next_is_written_at_once_after_what_was_buffered(bus_root, bh):
    """cfn_send's ``flush``: an agent's own send goes out in the call, behind its destination's buffer."""
    with bh.batcher_on_bus(bus_root, size=1000, max_size=1000, timeout_ms=600_000) as (bus, batcher, counters):
        batcher.send(bh.make_messages("s", ["z"]))  # starts a burst: written at once
        held = bh.make_messages("s", ["a", "a", "b"])
        batcher.send(held)  # continues it: buffered
        assert bus.read("a", "inbox/a") == []
        urgent = bh.make_messages("s", ["a", "c"])
        batcher.send(urgent, at_once=True)  # no flush call: written by this send
        assert [m.id for m in bh.received(bus, "a")] == [held[0].id, held[1].id, urgent[0].id]
        assert [m.id for m in bh.received(bus, "c")] == [urgent[1].id]
        assert set(batcher.buffers) == {"b"}  # the other destination's buffer waits for its flush
        assert counters["batch.flush.leading"] == 1 + 2
