"""``[redis]``: where the Redis server is and how the bus behaves on it."""

from __future__ import annotations

from attrs import define

from cfn_core import setting


@define(frozen=True)
class RedisSettings:
    """``[redis]``: the Redis Streams bus (plugin cfn-redis)."""

    url: str = setting(
        "redis://127.0.0.1:6379/0",
        "redis://[:password@]host:port/db or rediss:// for TLS",
    )
    lease: float = setting(5.0, "seconds without a heartbeat after which a host (or the run) counts as dead", min=0.5, max=3600.0)
    key_ttl: float = setting(86_400.0, "seconds the run's keys live if the coordinator never removes them", min=10.0, max=31_536_000.0)
    reconnect_timeout: float = setting(30.0, "seconds a lost connection is retried (with backoff) before the run fails", min=0.1, max=3600.0)
    max_deliveries: int = setting(5, "times an entry may be handed to a new host before it is dead-lettered (poison)", min=1, max=1000)
    pipeline: int = setting(512, "commands sent in one round trip; 1 turns pipelining off", min=1, max=100_000)
    read_count: int = setting(1000, "entries taken per stream in one XREADGROUP", min=1, max=100_000)
    local_agents: int = setting(-1, "agents the coordinator may start on its own machine; -1: no limit, 0: only on joined hosts", min=-1, max=1_000_000)
    wait_hosts: int = setting(0, "`cfn agent` hosts that must have joined before the first round starts", min=0, max=10_000)
