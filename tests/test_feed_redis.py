"""The feed on the Redis transport (plugin ``redis``): submit, after and cancel do not depend on the bus."""

import os
import sys
from concurrent.futures import as_completed
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "plugins", "cfn-redis", "tests"))
from redis_servers import _ping  # noqa: E402

from cfn_core import Cancelled, Coordinator  # noqa: E402
from cfn_core.testing import wait_for  # noqa: E402

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("CFN_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("plugins", [("redis",), ("redis", "batch", "pool")], ids=["redis", "redis+batch+pool"])
def test_submit_after_and_cancel_on_redis(make_config, no_leaks, tmp_path, plugins):
    if not _ping(REDIS_URL):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no Redis at {REDIS_URL}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    extra = {"pool": {"size": 3}} if "pool" in plugins else {}
    config = make_config(plugins=plugins, redis={"url": REDIS_URL},
                         workload={"agents": 3, "prefetch": 8, "directory": str(HERE), "handler": "feed_handlers:step_agent"}, **extra)
    marker = tmp_path / "running"
    with Coordinator(config) as coord:
        futures = [coord.submit(i) for i in range(300)]
        assert sorted(f.result() for f in as_completed(futures, timeout=120)) == list(range(300))
        first = coord.submit("first", id="first")
        assert coord.submit("then", after=[first]).result(60) == {"payload": "then", "after": {"first": "first"}}
        slow = coord.submit({"wait": str(marker)})
        wait_for(marker.exists, "the slow task to run")
        assert coord.cancel(slow.task_id)
        with pytest.raises(Cancelled):
            slow.result(60)
