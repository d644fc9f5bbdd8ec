"""500 agents on the Redis bus complete with delivery 1.0 (slow: it runs in CI, not in quick loops)."""

from __future__ import annotations

import pytest

from cfn_core import Coordinator
from cfn_core.plugins import installed

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(1800)
def test_500_agents_deliver_everything(no_leaks, redis_config):
    # fork from the pool's zygote when the spawning plugins are installed: the bus is under test, not spawning
    fast = tuple(p for p in ("pool", "parallel") if p in installed())
    config = redis_config(
        plugins=("redis", *fast),
        workload={"agents": 500, "topology": "mesh", "messages_per_agent": 2},
        run={"spawn_timeout": 600.0},
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok, [r.error for r in result.results.values() if not r.ok][:5]
    assert result.rounds[0].agents == 500
    assert result.planned == 2 * 500 + 500 * 2
    assert result.delivered == result.planned
    assert result.delivery_rate == 1.0
