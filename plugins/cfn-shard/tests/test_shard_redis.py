"""On cfn-redis, cfn-shard only routes: stream keys per shard, read by the transport itself."""

from __future__ import annotations

import pytest
from cfn_core import Coordinator
from cfn_core.plugins import installed


@pytest.mark.redis
def test_batch_and_shard_on_the_redis_bus(make_config, no_leaks):
    if "redis" not in installed():
        pytest.skip("cfn-redis is not installed")
    redis = pytest.importorskip("redis")
    try:
        redis.Redis().ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis server at 127.0.0.1:6379")
    config = make_config(
        plugins=("redis", "batch", "shard"),
        workload={"agents": 5, "topology": "mesh", "messages_per_agent": 10},
        shard={"count": 3},
    )
    with Coordinator(config) as coord:
        result = coord.run()
        route = coord.ctx.route("agent-0001")
    assert route.startswith("shard-") and route.endswith("/agent-0001")
    rnd = result.rounds[0]
    assert result.ok and rnd.delivered == rnd.planned == 2 * 5 + 5 * 10
    assert result.plugin_figures["shard"]["split_coordinator"] is False
