"""The origin flows of "agents that talk" on the Redis transport (plugin ``redis``)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "plugins", "cfn-redis", "tests"))
from redis_servers import _ping  # noqa: E402

from test_talk_api import HERE, origin_flows  # noqa: E402

REDIS_URL = os.environ.get("CFN_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("plugins", [("redis",), ("redis", "batch", "pool")], ids=["redis", "redis+batch+pool"])
def test_origin_flows_on_redis(make_config, no_leaks, plugins):
    if not _ping(REDIS_URL):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no Redis at {REDIS_URL}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    extra = {"pool": {"size": 4}} if "pool" in plugins else {}
    config = make_config(
        plugins=plugins, redis={"url": REDIS_URL},
        workload={"agents": 4, "handler": "talk_handlers:Flow", "directory": HERE, "timeout": 60}, **extra,
    )
    origin_flows(config)
