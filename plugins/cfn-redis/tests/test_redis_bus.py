"""The Redis bus at the transport level: round trip, order, atomic batches, acks, errors.

A :class:`~cfn_redis.bus.HubBus` (the coordinator's) and a
:class:`~cfn_redis.bus.LocalBus` (an agent's, in this process) on a real Redis
with the real relay process between them.
"""

from __future__ import annotations

import time

import pytest

from cfn_core import BusError, COORDINATOR_ID
from cfn_redis import keys
from cfn_redis.bus import HubBus, LocalBus

from redis_servers import RedisServer, run_keys

pytestmark = pytest.mark.redis


def _read_until(bus, agent, location, count, timeout=20.0):
    """Read ``agent``'s inbox, sleeping on its doorbell, until ``count`` records arrived."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        got += bus.read(agent, location)
        if len(got) >= count:
            break
        assert time.monotonic() < deadline, f"only {len(got)} of {count} records arrived"
        bus.wait(agent, 0.5)
    return got


def _until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def hub(redis_config):
    bus = HubBus.open(redis_config())
    bus.listen(COORDINATOR_ID)
    try:
        yield bus
    finally:
        bus.destroy()


def test_round_trip_in_order_both_ways(no_leaks, hub):
    agent = LocalBus.attach(hub.run_ref)
    try:
        agent.listen("a1")
        assert agent.read("a1", "inbox/a1") == []  # registers the inbox with the relay
        for i in range(200):
            hub.deliver("a1", "inbox/a1", [b'{"n":%d}\n' % i])
        got = _read_until(agent, "a1", "inbox/a1", 200)
        assert [r for r, _ in got] == [b'{"n":%d}\n' % i for i in range(200)]
        agent.ack("a1", [receipt for _, receipt in got])

        agent.deliver(COORDINATOR_ID, "inbox/_coordinator", [b'{"back":%d}\n' % i for i in range(50)])
        back = _read_until(hub, COORDINATOR_ID, "inbox/_coordinator", 50)
        assert [r for r, _ in back] == [b'{"back":%d}\n' % i for i in range(50)]
        hub.ack(COORDINATOR_ID, [receipt for _, receipt in back])

        # settled entries are acked and deleted in Redis by the relay
        client = hub.link.client
        stream = keys.inbox_key(hub.run_id, "inbox/a1")
        _until(lambda: client.xlen(stream) == 0, what="a1's stream emptied after ack")
        assert client.xpending(stream, keys.GROUP)["pending"] == 0
    finally:
        agent.close()


def test_batch_lands_whole_and_unacked_records_stay_pending(no_leaks, hub):
    agent = LocalBus.attach(hub.run_ref)
    try:
        agent.listen("a2")
        agent.read("a2", "inbox/a2")
        hub.deliver("a2", "inbox/a2", [b'{"b":%d}\n' % i for i in range(10)])
        got = _read_until(agent, "a2", "inbox/a2", 10)
        assert [r for r, _ in got] == [b'{"b":%d}\n' % i for i in range(10)]
        agent.ack("a2", [receipt for _, receipt in got[:4]])
        stream = keys.inbox_key(hub.run_id, "inbox/a2")
        client = hub.link.client
        # one deliver call is one stream entry: it stays pending until every record of it is settled
        _until(lambda: client.xpending(stream, keys.GROUP)["pending"] == 1, what="one pending entry")
        agent.ack("a2", [receipt for _, receipt in got[4:]])
        _until(lambda: client.xpending(stream, keys.GROUP)["pending"] == 0, what="entry acked")
    finally:
        agent.close()


def test_state_dead_letters_and_cleanup(no_leaks, hub, redis_url):
    hub.put_state("skip.a3", b'["t1"]')
    assert hub.get_state("skip.a3") == b'["t1"]'
    agent = LocalBus.attach(hub.run_ref)
    try:
        assert agent.get_state("skip.a3") == b'["t1"]'  # mirrored into the spool
        agent.dead_letter("a3", b"not json", "not JSON")
        _until(lambda: hub.dead_letter_count() == 1, what="agent's dead letter counted run-wide")
        assert hub.dead_letters()[0]["reason"] == "not JSON"
    finally:
        agent.close()
    run = hub.run_id
    assert run_keys(redis_url, run)
    hub.destroy()
    assert run_keys(redis_url, run) == []


def test_unreachable_redis_names_host_port_and_reason(make_config, no_leaks):
    config = make_config(plugins=("redis",), redis={"url": "redis://:sekret@127.0.0.1:1/3"})
    with pytest.raises(BusError) as err:
        HubBus.open(config)
    message = str(err.value)
    assert "127.0.0.1:1/3" in message and "cannot reach Redis" in message
    assert "sekret" not in message


def test_bad_url_scheme_is_a_clear_error(make_config):
    from cfn_core.plugins import make_plugin_manager

    config = make_config(plugins=("redis",), redis={"url": "http://127.0.0.1:6379"})
    with pytest.raises(BusError, match="scheme 'http' is not supported"):
        make_plugin_manager(config)


def test_password_url(no_leaks, make_config, tmp_path):
    server = RedisServer(password="s3cret")
    try:
        good = make_config(plugins=("redis",), redis={"url": server.url})
        bus = HubBus.open(good)
        bus.destroy()
        bad = make_config(plugins=("redis",), redis={"url": server.url.replace("s3cret", "wrong")})
        with pytest.raises(BusError) as err:
            HubBus.open(bad)
        assert "refused the credentials" in str(err.value) or "WRONGPASS" in str(err.value)
        assert "wrong@" not in str(err.value)
    finally:
        server.stop()


def test_tls_url(no_leaks, make_config, tmp_path):
    """rediss:// end to end: coordinator, relay and agents over a TLS-only Redis."""
    from cfn_core import Coordinator

    server = RedisServer(tls_dir=str(tmp_path))
    try:
        config = make_config(plugins=("redis",), redis={"url": server.url}, workload={"agents": 3})
        with Coordinator(config) as coord:
            result = coord.run()
        assert result.ok and result.delivery_rate == 1.0
        plain = make_config(plugins=("redis",), redis={"url": server.url.replace("rediss://", "redis://").split("?")[0]})
        with pytest.raises(BusError, match="cannot reach Redis"):
            HubBus.open(plain)  # a TLS port does not answer plain text
    finally:
        server.stop()
