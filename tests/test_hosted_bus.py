"""The bus scales with hosts, not agents (issue #19, docs/HOSTING.md "How it works").

A host's agents share one doorbell; the coordinator's rings to them go out one datagram
per host and slice of deliveries; a host writes what its agents send the coordinator in
a turn of its loop together; with cfn-batch a host batches for all its agents; on
cfn-redis hosted agents use their machine's one relay.  Real host processes, a real
/dev/shm bus, a real Redis server where named.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cfn_core import Coordinator, Task
from cfn_core.bus.doorbell import _dgram_qlen
from cfn_core.bus.shm import ShmBus
from cfn_core.errors import BusError

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, os.path.join(HERE, "..", "plugins", "cfn-redis", "tests"))
from redis_servers import _ping  # noqa: E402

REDIS_URL = os.environ.get("CFN_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def bus(bus_root):
    bus = ShmBus.create(str(bus_root))
    yield bus
    bus.destroy()


def test_deliveries_to_many_inboxes_of_one_shared_doorbell_ring_it_a_few_times_naming_all(bus):
    # one datagram per delivery overflowed the host's queue (net.unix.max_dgram_qlen, often 10)
    # and woken() returned None: the host then read every one of its agents' inboxes
    ids = [f"agent-{i:04d}" for i in range(1, 301)]  # three slices of deliveries: three datagrams
    for agent_id in ids:
        bus.listen_shared(agent_id, "_host.w.1")
    sender = ShmBus.attach(bus.run_dir)
    try:
        sender.deliver_many([(a, f"inbox/{a}", [b'{"x":1}\n']) for a in ids])
        assert _dgram_qlen() > 3  # what the next line relies on (Linux's default is 10)
        woken = bus.woken("_host.w.1")
        assert woken is not None, "the queue overflowed: the rings were not grouped"
        assert sorted(woken) == ids
        for agent_id in ids[:3]:
            assert [r for r, _ in bus.read(agent_id, f"inbox/{agent_id}")] == [b'{"x":1}\n']
    finally:
        sender.close()


def test_grouped_rings_still_wake_readers_with_doorbells_of_their_own(bus):
    bus.listen("solo-1")
    bus.listen("solo-2")
    bus.listen_shared("hosted-1", "_host.w.1")
    bus.listen_shared("hosted-2", "_host.w.1")
    sender = ShmBus.attach(bus.run_dir)
    try:
        sender.deliver_many([(a, f"inbox/{a}", [b"{}\n"]) for a in ("solo-1", "hosted-1", "solo-2", "hosted-2")])
        assert bus.wait("solo-1", 0) and bus.wait("solo-2", 0)
        assert sorted(bus.woken("_host.w.1")) == ["hosted-1", "hosted-2"]
    finally:
        sender.close()


def test_what_was_delivered_before_a_failing_delivery_is_rung(bus):
    bus.listen_shared("hosted-1", "_host.w.1")
    sender = ShmBus.attach(bus.run_dir)
    try:
        with pytest.raises(BusError):
            sender.deliver_many([("hosted-1", "inbox/hosted-1", [b"{}\n"]), ("../x", "inbox/../x", [b"{}\n"])])
        assert bus.woken("_host.w.1") == ["hosted-1"]  # appended, so rung: no reader sleeps on it
    finally:
        sender.close()


def host_counters(coord) -> dict[str, dict]:
    return {agent: c for (agent, _process), c in coord.ctx.agent_counters().items() if agent.startswith("_host.")}


def test_a_host_writes_its_agents_records_of_one_turn_together(make_config, no_leaks):
    agents = 600
    config = make_config(workload={"agents": agents, "handler": "hosted_handlers:echo", "directory": HERE,
                                   "host": "async", "hosts": 1, "timeout": 60})
    with Coordinator(config) as coord:
        result = coord.run(list(range(agents)))
        (counters,) = host_counters(coord).values()
    assert result.ok and result.delivery_rate == 1.0
    assert counters["host_records_posted"] == 2 * agents  # a ready and a result each
    # agents start a hundred per turn and are woken up to two hundred per turn: their
    # records were written a turn's worth at a time, not one append each
    assert counters["host_posted_writes"] * 10 <= counters["host_records_posted"]


def test_with_cfn_batch_a_host_batches_for_all_its_agents(make_config, no_leaks):
    agents = 200
    config = make_config(
        plugins=("batch",),
        workload={"agents": agents, "handler": "hosted_handlers:echo", "directory": HERE,
                  "host": "async", "hosts": 2, "timeout": 60},
    )
    with Coordinator(config) as coord:
        result = coord.run(list(range(agents)))
        hosts = host_counters(coord)
    assert result.ok and result.delivery_rate == 1.0
    assert set(hosts) == {"_host.worker.1", "_host.worker.2"}
    # one batcher per host: its batches carry many agents' records. An agent sends two (its
    # ready, its result, at different times), so a batch of more than 10 is several agents'
    from cfn_batch.stats import MESSAGES_BUCKETS

    assert sum(c["batch.messages"] for c in hosts.values()) >= 2 * agents
    over_10 = [f"batch.messages_le.{i}" for i, bound in enumerate(MESSAGES_BUCKETS) if bound > 10]
    over_10.append(f"batch.messages_le.{len(MESSAGES_BUCKETS)}")
    assert sum(c.get(key, 0) for c in hosts.values() for key in over_10) >= 1


def test_hosted_agents_on_redis_talk_to_each_other_and_to_process_agents(make_config, no_leaks):
    if not _ping(REDIS_URL):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no Redis at {REDIS_URL}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    config = make_config(
        plugins=("redis",), redis={"url": REDIS_URL},
        workload={"directory": HERE, "timeout": 60},
        agents={
            "h": {"count": 40, "handler": "hosted_handlers:Talker", "host": "async", "hosts": 2},
            "p": {"count": 2, "handler": "hosted_handlers:SyncTalker"},
        },
    )
    # tasks go round robin over the role's agents: h-0001..h-0020 ask h-0021..h-0040, which are
    # idle (an agent answers in on_message between its tasks), half of them in the other host
    tasks = [Task(id=f"h{i}", role="h", payload={"op": "ask", "to": f"h-{i + 21:04d}", "q": i}) for i in range(20)]
    tasks += [
        Task(id="toproc", role="h", payload={"op": "ask", "to": "p-0001", "q": "to a process"}),
        Task(id="fromproc", role="p", payload={"op": "ask", "to": "h-0007", "q": "from a process"}),
    ]
    with Coordinator(config) as coord:
        result = coord.run(tasks)
        pids = {h.pid for h in coord.ctx.state["cfn.hosting"].hosts.values() if h.alive}
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    for i in range(20):
        answer = result.results[f"h{i}"].value["answer"]
        assert answer["echo"] == {"q": i} and answer["by"] == f"h-{i + 21:04d}"
    assert result.results["toproc"].value["answer"]["by"] == "p-0001"
    assert result.results["fromproc"].value["answer"]["pid"] in pids


def test_a_slice_of_deliveries_that_fills_an_inbox_rings_it_before_waiting_for_room(bus_root):
    # the rings of a slice go out after its appends: an inbox filled by the slice's own
    # records, not rung yet, was never read, and the sender waited out its full_timeout
    # (the coordinator handing 40 tasks to 2 agents with inbox_depth = 3)
    import threading

    owner = ShmBus.create(str(bus_root), inbox_depth=3, full_timeout=60.0)
    reader = ShmBus.attach(owner.run_dir, inbox_depth=3)
    sender = ShmBus.attach(owner.run_dir, inbox_depth=3, full_timeout=60.0)
    got: list[bytes] = []
    try:
        reader.listen("slow")

        def read_all() -> None:
            while len(got) < 8 and reader.wait("slow", 120):
                records = reader.read("slow", "inbox/slow")
                got.extend(r for r, _ in records)
                reader.ack("slow", [receipt for _, receipt in records])

        thread = threading.Thread(target=read_all)
        thread.start()
        sender.deliver_many([("slow", "inbox/slow", [b'{"n":%d}\n' % i]) for i in range(8)])
        thread.join(120)
        assert got == [b'{"n":%d}\n' % i for i in range(8)]
    finally:
        sender.close()
        reader.close()
        owner.destroy()


@pytest.mark.parametrize("inbox_id", ["_coordinator", "_hosts", "_host.worker.1", "agent-0001"])
def test_inbox_ids_a_relay_reads_include_the_kernels_own(inbox_id):
    from cfn_core import check_inbox_id

    assert check_inbox_id(inbox_id) == inbox_id


@pytest.mark.parametrize("inbox_id", ["_host.", "_host../x", "_host.a/b", "_relay", "_other", "../x", "", 7])
def test_inbox_ids_that_are_not_agents_nor_the_kernels_are_refused(inbox_id):
    from cfn_core import ConfigError, check_inbox_id

    with pytest.raises(ConfigError):
        check_inbox_id(inbox_id)


def test_the_ringer_tells_shared_doorbells_from_readers_own(bus):
    # deliver_many groups the rings of shared doorbells only; a reader with a socket of its
    # own is rung after its append (deferring those slowed warm rounds of process agents)
    bus.listen("solo")
    bus.listen_shared("hosted", "_host.w.1")
    sender = ShmBus.attach(bus.run_dir)
    try:
        ringer = sender._ringer
        assert ringer.shared("hosted") and not ringer.shared("solo")
        assert not ringer.shared("nobody-yet")  # not listening: not known, looked at again next time
        bus.listen_shared("nobody-yet", "_host.w.1")
        assert ringer.shared("nobody-yet")
    finally:
        sender.close()
