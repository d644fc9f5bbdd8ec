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


CFN = [os.path.join(os.path.dirname(sys.executable), "cfn")]


def _redis_or_skip():
    if not _ping(REDIS_URL):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no Redis at {REDIS_URL}")
        pytest.skip(f"no Redis at {REDIS_URL}")


def test_cfn_cancel_and_cfn_stop_reach_a_run_on_redis(make_config, no_leaks, tmp_path):
    """The commands write the local run directory; the Redis bus's state lives in Redis
    (they were ignored there: the coordinator read the requests from Redis)."""
    import subprocess

    from cfn_core.live import StopRequested

    _redis_or_skip()
    config = make_config(plugins=("redis",), redis={"url": REDIS_URL},
                         workload={"agents": 2, "directory": str(HERE), "handler": "feed_handlers:cooperative"})
    started = tmp_path / "started"
    with pytest.raises(StopRequested):
        with Coordinator(config) as coord:
            run_dir = coord.ctx.bus.run_ref
            slow = coord.submit({"started": str(started)})
            wait_for(started.exists, "the task to run")
            cancel = subprocess.run(CFN + ["cancel", run_dir, slow.task_id, "--wait", "120"], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=150)
            assert cancel.returncode == 0, cancel.stderr
            with pytest.raises(Cancelled):
                slow.result(60)
            stop = subprocess.Popen(CFN + ["stop", run_dir, "--wait", "120"], cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True)
            coord.run([{"started": str(tmp_path / f"r{i}")} for i in range(2)])  # runs until stopped
    _, err = stop.communicate(timeout=150)
    assert stop.returncode == 0 and "has stopped" in err, err
    assert not os.path.exists(run_dir)
