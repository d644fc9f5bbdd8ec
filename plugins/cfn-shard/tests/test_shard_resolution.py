"""Coordinator and agents resolve the same inbox locations, whatever the strategy."""

from __future__ import annotations

import pytest
from cfn_core import COORDINATOR_ID, Coordinator

from cfn_shard.layout import shard_of


@pytest.mark.parametrize("strategy", ["hash", "round-robin", "random"])
def test_agents_read_where_the_coordinator_writes(make_config, no_leaks, probe_handler, strategy):
    config = make_config(
        plugins=("shard",),
        workload={"agents": 6, "handler": probe_handler, "seed": 5},
        shard={"count": 4, "strategy": strategy},
    )
    with Coordinator(config) as coord:
        result = coord.run()
        ctx = coord.ctx
        for task in result.results.values():
            agent = task.agent
            k = shard_of(agent, 4, strategy, 5)
            assert ctx.route(agent) == f"shard-{k}/{agent}"
            # the files the agent process really holds open: its own inbox (read) and the
            # part of the coordinator's inbox of its shard (results, ready)
            assert f"shard-{k}/{agent}" in task.value
            assert f"shard-{k}/{COORDINATOR_ID}" in task.value
            assert not [p for p in task.value if p.endswith(COORDINATOR_ID) and p != f"shard-{k}/{COORDINATOR_ID}"]
    assert result.ok


def test_unsplit_coordinator_inbox_is_one_file(make_config, no_leaks, probe_handler):
    config = make_config(
        plugins=("shard",), workload={"agents": 4, "handler": probe_handler}, shard={"count": 4, "split_coordinator": False}
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    for task in result.results.values():
        assert [p for p in task.value if p.endswith(COORDINATOR_ID)] == [f"shard-0/{COORDINATOR_ID}"]
