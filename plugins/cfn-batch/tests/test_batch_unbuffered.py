"""A process that never has two messages to coalesce never builds a batcher; one that has, batches."""

from __future__ import annotations

import os

import pytest

from cfn_core import COORDINATOR_ID, BusError, Coordinator, config_from_dict
from cfn_core.agent import AgentContext


@pytest.fixture
def agent_ctx(bus_root):
    """An agent's context with cfn-batch on a real session's shm bus (the coordinator reads it)."""
    config = config_from_dict({"plugins": ["batch"], "workload": {"agents": 2}, "bus": {"root": str(bus_root)}})
    coord = Coordinator(config)
    coord.open()
    run_ref = os.fspath(coord.ctx.bus.run_dir)
    ctx = AgentContext(config, coord.pm, "agent-0001", run_ref)
    ctx.bus = coord.pm.hook.cfn_bus(config=config, run_ref=run_ref)
    ctx.pm.hook.cfn_agent_init(ctx=ctx)
    try:
        yield coord, ctx
    finally:
        ctx.pm.hook.cfn_agent_exit(ctx=ctx)  # the batcher's final flush and its flusher's end, if it has them
        ctx.bus.close()
        coord.close()


def arrived(coord, inbox=COORDINATOR_ID):
    if inbox == COORDINATOR_ID:
        ctx = coord.ctx
        return [m.body["n"] for m in ctx.hook.cfn_read(ctx=ctx, agent_id=COORDINATOR_ID) if m.kind == "status"]
    return [raw for raw, _ in coord.ctx.bus.read(inbox, f"inbox/{inbox}")]


def status(ctx, n, dst=COORDINATOR_ID):
    return ctx.factory.make(dst, "status", body={"n": n})


def test_one_message_between_flushes_is_written_at_once_without_a_batcher(agent_ctx):
    coord, ctx = agent_ctx
    for n in range(3):  # a ready, then results, each followed by the kernel's flush before a sleep
        ctx.send([status(ctx, n)])
        assert arrived(coord) == [n]  # written during the send
        ctx.pm.hook.cfn_flush(ctx=ctx, reason="explicit")
    assert "batch" not in ctx.state  # no batcher was ever built
    c = ctx.counters
    assert (c["batch.batches"], c["batch.messages"], c["batch.flush.leading"], c["batch.latency_le.0"]) == (3, 3, 3, 3)


def test_a_second_message_before_the_flush_is_batched(agent_ctx):
    coord, ctx = agent_ctx
    ctx.send([status(ctx, 1)])
    ctx.send([status(ctx, 2)])
    ctx.send([status(ctx, 3)])
    assert arrived(coord) == [1]  # the first at once; the others continue its burst: buffered
    assert "batch" in ctx.state
    ctx.pm.hook.cfn_flush(ctx=ctx, reason="explicit")
    assert arrived(coord) == [2, 3]  # one write of both, in order
    assert ctx.counters["batch.flush.explicit"] == 1 and ctx.counters["batch.messages"] == 3


def test_several_messages_in_one_send_are_written_grouped_at_once(agent_ctx):
    coord, ctx = agent_ctx
    ctx.send([status(ctx, 1), status(ctx, 2, "agent-0002"), status(ctx, 3)])
    assert arrived(coord) == [1, 3]  # a send that starts a burst: written during the call, grouped
    assert len(arrived(coord, "agent-0002")) == 1
    assert ctx.counters["batch.batches"] == 2


def test_a_failed_write_without_a_batcher_keeps_the_message_for_the_next_flush(agent_ctx):
    coord, ctx = agent_ctx
    planted = os.path.join(coord.ctx.bus.run_dir, "inbox", "agent-0002")
    os.makedirs(os.path.dirname(planted), exist_ok=True)
    os.mkfifo(planted)  # the shm bus refuses to write into anything but a regular file
    with pytest.raises(BusError, match="planted"):
        ctx.send([status(ctx, 7, "agent-0002")])
    os.unlink(planted)
    ctx.pm.hook.cfn_flush(ctx=ctx, reason="explicit")
    assert [b'"n":7' in raw for raw in arrived(coord, "agent-0002")] == [True]  # not lost, written once
