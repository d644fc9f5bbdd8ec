"""Real Redis servers for the cfn-redis tests (never a fake).

* ``redis_url``: ``CFN_REDIS_URL`` if set, else the server on 127.0.0.1:6379
  if it answers, else a private ``redis-server`` started for the session.
* ``private_redis``: always a private ``redis-server --port <free> --save ""
  --appendonly no`` for one test, which the test may restart (losing
  everything, like a production Redis without persistence) or stop.

A test needing Redis is skipped only when no server can be found or started,
and never when ``CI=true``: there a missing Redis is a failure.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from redis_servers import RedisServer, _ping, _unavailable  # noqa: E402

@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("CFN_REDIS_URL")
    if url:
        if not _ping(url):
            _unavailable(f"CFN_REDIS_URL={url} does not answer")
        yield url
        return
    if _ping("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    server = RedisServer(daemon=True)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis():
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_config(make_config, redis_url):
    """``redis_config(workload={...}, redis={...})``: a Config with the redis plugin on ``redis_url``."""

    def make(plugins=("redis",), redis=None, **tables):
        return make_config(plugins=plugins, redis={"url": redis_url, **(redis or {})}, **tables)

    return make


