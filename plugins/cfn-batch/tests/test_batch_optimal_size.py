"""optimal_batch_size: the adaptive size from the observed message rate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfn_batch import optimal_batch_size


def test_low_rate_keeps_the_configured_size():
    assert optimal_batch_size(0.0, 0.1, 50, 500) == 50
    assert optimal_batch_size(10.0, 0.1, 50, 500) == 50  # 10 msg/s fill 0.5 of a batch in 50 ms


def test_size_grows_with_rate_so_a_batch_fills_in_half_the_timeout():
    assert optimal_batch_size(2000.0, 0.1, 50, 500) == 100
    assert optimal_batch_size(4000.0, 0.1, 50, 500) == 200
    assert optimal_batch_size(4000.0, 0.05, 50, 500) == 100  # a tighter latency budget, smaller batches


def test_capped_at_max_size():
    assert optimal_batch_size(1e9, 0.1, 50, 500) == 500


def test_floor_above_ceiling_is_an_error():
    with pytest.raises(ValueError):
        optimal_batch_size(100.0, 0.1, 10, 5)


@given(
    rate=st.floats(min_value=0, max_value=1e8, allow_nan=False),
    timeout=st.floats(min_value=1e-3, max_value=60),
    floor=st.integers(1, 1000),
    extra=st.integers(0, 10_000),
)
def test_bounds_and_latency_budget(rate, timeout, floor, extra):
    ceiling = floor + extra
    size = optimal_batch_size(rate, timeout, floor, ceiling)
    assert floor <= size <= ceiling
    if size > floor:
        # any size above the floor fills within half of the timeout at this rate
        assert size / rate <= timeout / 2 + 1e-9


@given(rate=st.floats(min_value=0, max_value=1e7), more=st.floats(min_value=0, max_value=1e7))
def test_monotonic_in_rate(rate, more):
    assert optimal_batch_size(rate, 0.1, 50, 500) <= optimal_batch_size(rate + more, 0.1, 50, 500)


def test_batcher_adapts_upward_under_heavy_traffic_and_never_exceeds_max_size(bus_root, bh):
    import time

    with bh.batcher_on_bus(bus_root, size=5, max_size=40, timeout_ms=100) as (bus, batcher, counters):
        deadline = time.monotonic() + 30
        # one destination at many thousand msg/s: the rate window (0.25 s) sees it and grows the size
        while batcher.size == 5 and time.monotonic() < deadline:
            batcher.send(bh.make_messages("s", ["a"] * 200))
            assert all(len(b) <= 40 for b in batcher.buffers.values())
        assert 5 < batcher.size <= 40
        assert counters["batch.size_now"] == batcher.size
