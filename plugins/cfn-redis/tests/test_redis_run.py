"""Whole coordinations on the Redis bus: real agents, real relay, real Redis."""

from __future__ import annotations

import pytest

from cfn_core import Coordinator
from cfn_core.plugins import installed

from redis_servers import run_keys

pytestmark = pytest.mark.redis


def test_star_round_delivers_everything_and_leaves_nothing(no_leaks, redis_config, redis_url):
    config = redis_config(workload={"agents": 8, "payload_bytes": 20, "rounds": 2})
    with Coordinator(config) as coord:
        run = coord.ctx.bus.run_id
        assert coord.ctx.bus.name == "redis"
        result = coord.run()
    assert result.ok and result.bus == "redis"
    assert result.delivery_rate == 1.0
    assert all(r.delivered == r.planned == 16 for r in result.rounds)
    assert {r.value for r in result.results.values()} == {"x" * 20}
    assert result.plugin_figures["redis"]["run"] == run
    assert run_keys(redis_url, run) == []


def test_mesh_round_counts_peer_messages(no_leaks, redis_config):
    config = redis_config(workload={"agents": 6, "topology": "mesh", "messages_per_agent": 5})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    assert result.planned == 2 * 6 + 6 * 5
    assert result.delivered == result.planned


def test_many_tasks_per_agent_keep_their_order(no_leaks, redis_config):
    config = redis_config(workload={"agents": 3, "tasks": 300})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok and result.delivery_rate == 1.0
    assert len(result.results) == 300


@pytest.mark.parametrize("extra", [("pool",), ("parallel",), ("batch",), ("shard",), ("pool", "parallel", "batch", "shard")])
def test_composes_with_other_plugins(no_leaks, redis_config, extra):
    missing = [p for p in extra if p not in installed()]
    if missing:
        pytest.skip(f"plugin(s) {missing} not installed")
    tables = {"shard": {"split_coordinator": False}} if "shard" in extra else {}  # shard refuses non-shm buses for it
    config = redis_config(plugins=("redis", *extra), workload={"agents": 6, "tasks": 30, "rounds": 2}, **tables)
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
