"""Faults on the Redis bus: agents SIGKILLed, Redis connections cut, Redis restarted, poison entries.

Every fault is injected from the coordinator's own progress callback (called
from its event loop during the collect phase), so it lands while tasks are
outstanding, without sleeping to guess the moment.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from cfn_core import COORDINATOR_ID, BusError, Coordinator
from cfn_redis import keys
from cfn_redis.bus import HubBus, LocalBus

pytestmark = pytest.mark.redis

SLOW_ECHO = "sleep 0.3; cat"


class OnCollect:
    """A progress callback that runs ``action(coord)`` once, at the first collect wake-up."""

    def __init__(self, action):
        self.action = action
        self.coord = None
        self.fired = False

    def __call__(self, phase, done, total):
        if phase == "collect" and not self.fired:
            self.fired = True
            self.action(self.coord)


def _run(config, action):
    hook = OnCollect(action)
    coord = Coordinator(config, progress=hook)
    hook.coord = coord
    with coord:
        result = coord.run()
    assert hook.fired
    return result


def test_sigkilled_agents_are_replaced_and_reread_their_inbox(no_leaks, redis_config):
    config = redis_config(workload={"agents": 6, "tasks": 18, "command": SLOW_ECHO, "payload_bytes": 8})
    killed = []

    def kill_three(coord):
        for handle in list(coord.ctx.agents.values())[:3]:
            os.kill(handle.pid, signal.SIGKILL)
            killed.append(handle.id)

    result = _run(config, kill_three)
    assert len(killed) == 3
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
    assert result.rounds[0].retries >= 3


def test_cut_connections_are_retried(no_leaks, private_redis, make_config):
    # a private server: CLIENT KILL must not cut other tests' clients
    config = make_config(
        plugins=("redis",),
        redis={"url": private_redis.url},
        workload={"agents": 4, "tasks": 12, "command": SLOW_ECHO, "payload_bytes": 8},
    )
    admin = private_redis.client()
    cut = []

    def cut_everyone(coord):
        # every client but this one: the relay's blocking reader, its writer, the coordinator's
        cut.append(admin.client_kill_filter(_type="normal", skipme=True))

    try:
        result = _run(config, cut_everyone)
    finally:
        admin.close()
        admin.connection_pool.disconnect()
    assert cut and cut[0] >= 3
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0


def test_redis_restarted_without_persistence_fails_the_run_loudly(no_leaks, private_redis, make_config):
    config = make_config(
        plugins=("redis",),
        redis={"url": private_redis.url, "reconnect_timeout": 10.0},
        workload={"agents": 4, "tasks": 8, "command": "sleep 1; cat", "payload_bytes": 8},
        run={"shutdown_timeout": 1.0},
    )
    with pytest.raises(BusError) as err:
        _run(config, lambda coord: private_redis.restart())
    assert "no longer holds this run" in str(err.value)
    assert "lost" in str(err.value)


def test_poison_entries_are_dead_lettered_and_the_rest_reclaimed(no_leaks, redis_config):
    """Entries a dead host held are reclaimed by the new reader, except those handed out too often."""
    hub = HubBus.open(redis_config(redis={"max_deliveries": 3}))
    agent = None
    try:
        hub.listen(COORDINATOR_ID)
        r = hub.link.client
        key = keys.inbox_key(hub.run_id, "inbox/a9")
        r.xgroup_create(key, keys.GROUP, id="0", mkstream=True)
        poison = r.xadd(key, {"m": b'{"poison":1}\n'})
        fine = r.xadd(key, {"m": b'{"fine":1}\n'})
        # a host that died took both; the first was then handed out twice more (two more dead hosts)
        r.xreadgroup(keys.GROUP, "dead-host-1", {key: ">"})
        r.xclaim(key, keys.GROUP, "dead-host-2", 0, [poison])
        r.xclaim(key, keys.GROUP, "dead-host-3", 0, [poison])
        agent = LocalBus.attach(hub.run_ref)
        agent.listen("a9")
        got = []
        deadline = time.monotonic() + 20
        while not got:
            got = agent.read("a9", "inbox/a9")
            assert time.monotonic() < deadline, "the reclaimed entry never arrived"
            if not got:
                agent.wait("a9", 0.5)
        assert [rec for rec, _ in got] == [b'{"fine":1}\n']
        assert hub.dead_letter_count() == 1
        assert "poison message" in hub.dead_letters()[0]["reason"]
        assert fine in [p["message_id"] for p in r.xpending_range(key, keys.GROUP, "-", "+", 10)]
    finally:
        if agent is not None:
            agent.close()
        hub.destroy()


def test_garbage_on_an_inbox_stream_is_dead_lettered_and_counted(no_leaks, redis_config):
    config = redis_config(workload={"agents": 3, "tasks": 9, "command": SLOW_ECHO, "payload_bytes": 8})

    def inject(coord):
        client = coord.ctx.bus.link.client
        client.xadd(keys.inbox_key(coord.ctx.bus.run_id, coord.ctx.route("agent-0001")), {"m": b"\x00not a message\n"})

    result = _run(config, inject)
    assert result.ok and result.delivery_rate == 1.0
    assert result.rounds[0].dead_lettered == 1


def test_a_killed_relay_is_relaunched_and_the_run_carries_on(no_leaks, redis_config, tmp_path):
    """SIGKILL the coordinator machine's relay three times (tasks still in the outbox, results
    outstanding): it is relaunched, resumes from the spool, and every task's result counts once."""
    from collections import Counter

    log = tmp_path / "executions"
    config = redis_config(
        workload={"agents": 4, "command": f"printf '%s\\n' \"$(cat)\" >> {log}; sleep 0.3; echo done"},
        run={"shutdown_timeout": 5.0},
    )
    tasks = [f"task-{i:02d}" for i in range(16)]
    killed: list[int] = []

    def kill_relay(coord):
        relay = coord.ctx.bus.relay
        if relay is not None and relay.pid not in killed and relay.poll() is None:
            killed.append(relay.pid)
            os.kill(relay.pid, signal.SIGKILL)

    fired: set[str] = set()

    def progress(phase, done, total):
        # during distribute the tasks wait in the outbox; in collect, entries are pending in Redis
        stage = {"distribute": "distribute"}.get(phase) or (phase == "collect" and ("half" if done >= total // 2 else "first"))
        if stage and stage not in fired:
            fired.add(stage)
            kill_relay(coord)

    coord = Coordinator(config, progress=progress)
    with coord:
        result = coord.run(tasks)
    assert len(killed) == 3, killed
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
    assert len(result.results) == len(tasks) and result.delivered == result.planned
    assert sorted(r.value.strip() for r in result.results.values()) == ["done"] * len(tasks)
    assert result.plugin_figures["redis"]["relay_relaunches"] == len(killed)
    executions = Counter(line.strip('"') for line in log.read_text().split())
    assert set(executions) == set(tasks)  # nothing lost; a duplicate can only come from the outbox window


def test_a_relay_that_keeps_dying_fails_the_run_with_the_reason(no_leaks, redis_config):
    """A crash-looping relay is relaunched RELAY_RESTARTS times, then the run fails, naming why."""
    from cfn_redis.bus import RELAY_RESTARTS

    coord = Coordinator(redis_config(workload={"agents": 2, "tasks": 2, "command": "cat", "payload_bytes": 8}))
    with coord:
        bus = coord.ctx.bus
        for _ in range(RELAY_RESTARTS):
            os.kill(bus.relay.pid, signal.SIGKILL)
            bus.relay.wait(60)
            bus.check()  # relaunches it
        assert bus.relaunches == RELAY_RESTARTS
        os.kill(bus.relay.pid, signal.SIGKILL)
        bus.relay.wait(60)
        with pytest.raises(BusError) as err:
            coord.run()  # its first tick finds the relay dead once too often
    assert f"the relay process died {RELAY_RESTARTS + 1} times within 60s (last exit status -9)" in str(err.value)
