"""Added latency is counted per message: each record's own wait, not its batch's oldest."""

from __future__ import annotations

from cfn_batch.stats import LATENCY_BUCKETS, BatchStats, figures


def test_each_message_lands_in_the_bucket_of_its_own_wait():
    counters: dict = {}
    stats = BatchStats(counters, 50)
    now = 100.0
    # waits of 0.3 s, 0.01 s (twice: same send call) and 0.00005 s, oldest first
    stats.batch("size", 4, 400, now, [now - 0.3, now - 0.008, now - 0.008, now - 0.00005])
    hist = [counters.get(f"batch.latency_le.{i}", 0) for i in range(len(LATENCY_BUCKETS) + 1)]
    assert hist[LATENCY_BUCKETS.index(0.5)] == 1
    assert hist[LATENCY_BUCKETS.index(0.01)] == 2
    assert hist[LATENCY_BUCKETS.index(0.0001)] == 1
    assert sum(hist) == 4  # messages, not batches
    assert abs(counters["batch.latency_max_us"] - 300_000) <= 1
    assert abs(counters["batch.latency_sum_us"] - 316_050) <= 1
    # a batch written during its send lands whole in the first bucket
    stats.batch("leading", 96, 9600, now, [now] * 96)
    assert counters["batch.latency_le.0"] == 97
    fig = figures(counters)
    # 99% of the 100 messages waited at most 10 ms, whatever the one old message did
    assert fig["added_latency_p99_ms_at_most"] == 10.0
    assert abs(fig["added_latency_max_ms"] - 300.0) <= 0.001
    assert abs(fig["added_latency_mean_ms"] - 3.16) <= 0.001
    assert fig["messages_per_batch"] == 50.0


def test_a_wait_below_the_first_bucket_bound_still_counts_as_the_longest():
    counters: dict = {}
    stats = BatchStats(counters, 50)
    stats.batch("explicit", 2, 200, 10.0, [10.0 - 0.00008, 10.0])  # 80 us: inside the first bucket
    assert counters["batch.latency_le.0"] == 2
    assert 79 <= counters["batch.latency_max_us"] <= 80
    stats.batch("leading", 5, 500, 11.0, None)  # written during the send: no wait, the max stays
    assert 79 <= counters["batch.latency_max_us"] <= 80


def test_a_counter_exists_once_counted_and_not_before():
    # a forked agent pays a copied page for every key it touches: one leading write of one
    # message touches the seven counters of that write, none of the other buckets
    counters: dict = {}
    stats = BatchStats(counters, 50)
    assert counters == {"batch.size_now": 50}
    stats.batch("leading", 1, 120, 5.0, None)
    assert counters == {
        "batch.size_now": 50,
        "batch.batches": 1,
        "batch.messages": 1,
        "batch.bytes": 120,
        "batch.flush.leading": 1,
        "batch.messages_le.0": 1,
        "batch.bytes_le.0": 1,
        "batch.latency_le.0": 1,
    }
    stats.deliver_error()
    assert counters["batch.deliver_errors"] == 1
    assert figures(counters)["flushes"]["size"] == 0  # a missing counter reads as 0
