"""Connections: clear errors, retries with backoff, and noticing a Redis that lost the run.

``redis`` is imported here only: agent processes never import it (it costs
~0.2 s of start-up and a connection each); they talk to their host's relay
through /dev/shm.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from cfn_core import BusError

log = logging.getLogger("cfn.redis")


class RunLost(BusError):
    """Redis no longer holds the run (it restarted without persistence, or the keys were removed)."""


def describe(url: str) -> str:
    """``host:port/db`` of a URL, without the password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 6379
    except ValueError:
        return "<invalid url>"
    db = (parts.path or "/0").lstrip("/") or "0"
    return f"{'rediss' if parts.scheme == 'rediss' else 'redis'}://{host}:{port}/{db}"


def check_url(url: str, where: str = "[redis] url") -> None:
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        raise BusError(f"{where} = {describe(url)!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BusError(f"{where}: scheme {parts.scheme!r} is not supported; use redis://, rediss:// (TLS) or unix://")


def connect(url: str, *, timeout: float = 5.0, blocking: bool = False):
    """A connected client (bytes replies); raises BusError naming host, port and the reason."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    check_url(url)
    try:
        client = redis.Redis.from_url(
            url,
            # no hidden retries: Link retries, counts reconnections and checks the run survived
            # (a blocking XREADGROUP whose reply was lost must be followed by a re-read of the PEL)
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=timeout,
            socket_timeout=None if blocking else max(timeout, 10.0),
            socket_keepalive=True,
            health_check_interval=0,
        )
        client.ping()
    except redis.AuthenticationError as exc:
        raise BusError(f"Redis at {describe(url)} refused the credentials in [redis] url: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BusError(
            f"cannot reach Redis at {describe(url)} ([redis] url or CFN_REDIS_URL): {exc}; "
            "is redis-server running and reachable from this machine?"
        ) from None
    except redis.ResponseError as exc:
        raise BusError(f"Redis at {describe(url)} answered with an error: {exc}") from None
    return client


def close(client) -> None:
    if client is not None:
        try:
            client.close()
            client.connection_pool.disconnect()
        except Exception:
            pass


class Link:
    """One client that reconnects with exponential backoff and checks the run survived.

    ``call(fn)`` runs ``fn(client)``; a connection error is retried for up to
    ``reconnect_timeout`` seconds; after a reconnection the run's meta key must
    still exist, else :class:`RunLost` (with ``--save ""`` a restarted Redis
    has forgotten every message: the run must fail, not wait forever).
    """

    def __init__(self, url: str, meta_key: str | None, reconnect_timeout: float, *, blocking: bool = False):
        self.url = url
        self.meta_key = meta_key
        self.reconnect_timeout = reconnect_timeout
        self.blocking = blocking
        self.client = connect(url, blocking=blocking)
        self.reconnects = 0

    def call(self, fn):
        import redis

        deadline = None
        delay = 0.02
        while True:
            try:
                return fn(self.client)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    log.warning("lost Redis at %s (%s); reconnecting", describe(self.url), exc)
                if now >= deadline:
                    raise BusError(
                        f"lost Redis at {describe(self.url)} and could not reconnect within "
                        f"{self.reconnect_timeout:g}s ([redis] reconnect_timeout): {exc}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    self.client.connection_pool.disconnect()
                    self.client.ping()
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    continue
                self.reconnects += 1
                self.check_run()

    def check_run(self) -> None:
        if self.meta_key is not None and not self.client.exists(self.meta_key):
            raise RunLost(
                f"Redis at {describe(self.url)} no longer holds this run ({self.meta_key} is gone): it restarted "
                "without persistence or the keys were deleted; messages on the bus were lost, the run fails"
            )

    def close(self) -> None:
        close(self.client)
        self.client = None
