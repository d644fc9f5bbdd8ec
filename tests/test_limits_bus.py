"""Limits, each a clear error: message size, inbox depth (held under concurrent senders), agent count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import fault_env, plugin_params  # noqa: E402,F401

from cfn_core import ConfigError, Coordinator, InboxFull, Message, MessageTooLarge  # noqa: E402
from cfn_core.bus.shm import ShmBus  # noqa: E402

CFN = os.path.join(os.path.dirname(sys.executable), "cfn")


# ---------------------------------------------------------------------- message size


def test_message_over_the_size_limit_is_refused_with_the_figures():
    msg = Message(id="a.1.1", src="a", dst="b", kind="peer", body="x" * 5000)
    with pytest.raises(MessageTooLarge) as exc:
        msg.encode(limit=1024)
    text = str(exc.value)
    assert "message a.1.1 (peer from a to b)" in text and "bus.max_message_bytes allows 1024" in text
    assert f"is {len(msg.encode())} bytes" in text


def test_payload_that_cannot_fit_is_a_config_error(make_config):
    config = make_config(workload={"agents": 1, "payload_bytes": 2000}, bus={"max_message_bytes": 1024})
    with pytest.raises(ConfigError, match=r"payload_bytes = 2000 does not fit.*max_message_bytes = 1024"):
        Coordinator(config)


def test_oversized_result_fails_its_task_with_the_reason(make_config, fault_env, no_leaks):
    config = make_config(
        workload={"agents": 2, "payload_bytes": 100, "handler": "test_faults_handlers:grow"},
        bus={"max_message_bytes": 1024},
    )
    with Coordinator(config) as coord:
        result = coord.run(["x" * 100, "x" * 300])
    small, big = (result.results[k] for k in sorted(result.results))
    assert small.ok and small.value == "x" * 400
    assert not big.ok and big.answered
    assert big.error.startswith("result not sent: message ") and "bus.max_message_bytes allows 1024" in big.error


def test_oversized_record_on_the_bus_is_dead_lettered(make_config, no_leaks):
    """A record bigger than the limit (written by something that ignored it) never reaches a handler."""
    from cfn_core.builtin import decode_records

    config = make_config(bus={"max_message_bytes": 1024})
    bus = ShmBus.create(config.bus.root)
    try:
        big = Message(id="x.1.1", src="x", dst="a1", kind="task", body="y" * 4000).encode()
        ok = Message(id="x.1.2", src="x", dst="a1", kind="task", body="fine").encode()
        bus.deliver("a1", "inbox/a1", [big, ok])

        class Ctx:
            counters = {"dead_lettered": 0}

        ctx = Ctx()
        ctx.config, ctx.bus = config, bus
        got = decode_records(ctx, "a1", bus.read("a1", "inbox/a1"))
        assert [m.id for m in got] == ["x.1.2"]
        (dead,) = bus.dead_letters()
        assert dead["agent"] == "a1" and "exceeds bus.max_message_bytes=1024" in dead["reason"]
    finally:
        bus.destroy()


# ---------------------------------------------------------------------- inbox depth


def test_full_inbox_raises_inbox_full_and_sends_nothing(bus_root):
    bus = ShmBus.create(str(bus_root), inbox_depth=5, full_timeout=0.2)
    try:
        for i in range(5):
            bus.deliver("a1", "inbox/a1", [b'{"n":%d}\n' % i])
        with pytest.raises(InboxFull) as exc:
            bus.deliver("a1", "inbox/a1", [b'{"n":5}\n', b'{"n":6}\n'])
        text = str(exc.value)
        assert "inbox of a1 holds 5 unsettled messages ([bus] inbox_depth = 5)" in text
        assert "2 message(s) were not sent" in text and "raise [bus] inbox_depth" in text
        assert (bus.run_dir / "inbox" / "a1").read_bytes().count(b"\n") == 5
        # the reader settles two: exactly two more fit
        reader = ShmBus.attach(bus.run_dir, inbox_depth=5, full_timeout=0.2)
        try:
            records = reader.read("a1", "inbox/a1")
            reader.ack("a1", [r for _, r in records[:2]])
            bus.deliver("a1", "inbox/a1", [b'{"n":5}\n', b'{"n":6}\n'])
            with pytest.raises(InboxFull):
                bus.deliver("a1", "inbox/a1", [b'{"n":7}\n'])
        finally:
            reader.close()
    finally:
        bus.destroy()


def test_more_inboxes_than_the_process_may_map_keep_their_depth(bus_root):
    """A process appending to more inboxes than vm.max_map_count allows mappings (a coordinator
    of 100,000 hosted agents): the counters beyond the mapped ones go through their files,
    and the depth still holds there, against a reader that has them mapped."""
    with open("/proc/sys/vm/max_map_count") as f:
        inboxes = int(f.read()) + 2_000
    bus = ShmBus.create(str(bus_root), inbox_depth=2, full_timeout=0.2)
    try:
        for i in range(inboxes):  # the old code: BusError (mmap: Cannot allocate memory) near 65,000
            bus.deliver(f"a{i}", f"inbox/a{i}", [b'{"n":0}\n'])
        last = f"a{inboxes - 1}"
        bus.deliver(last, f"inbox/{last}", [b'{"n":1}\n'])
        with pytest.raises(InboxFull):
            bus.deliver(last, f"inbox/{last}", [b'{"n":2}\n'])
        reader = ShmBus.attach(bus.run_dir, inbox_depth=2, full_timeout=0.2)
        try:
            records = reader.read(last, f"inbox/{last}")
            assert len(records) == 2
            reader.ack(last, [records[0][1]])
            bus.deliver(last, f"inbox/{last}", [b'{"n":2}\n'])  # one settled: exactly one more fits
            with pytest.raises(InboxFull):
                bus.deliver(last, f"inbox/{last}", [b'{"n":3}\n'])
        finally:
            reader.close()
    finally:
        bus.destroy()


def test_coordinator_inbox_is_not_limited(bus_root):
    bus = ShmBus.create(str(bus_root), inbox_depth=3, full_timeout=0.1)
    try:
        for _ in range(20):
            bus.deliver("_coordinator", "inbox/_coordinator", [b"{}\n"])
    finally:
        bus.destroy()


_SENDER = textwrap.dedent(
    """
    import sys
    from cfn_core.bus.shm import ShmBus
    from cfn_core.messages import MessageFactory
    run_dir, name, count, depth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bus = ShmBus.attach(run_dir, inbox_depth=depth, full_timeout=60.0)
    factory = MessageFactory(name)
    for _ in range(count):
        bus.deliver("r1", "inbox/r1", [factory.make("r1", "peer").encode()])
    bus.close()
    """
)


def test_inbox_depth_holds_under_concurrent_senders(bus_root, no_leaks):
    """4 sender processes, 300 messages each, depth 40: the reader never finds more than 40
    unsettled, every sender's messages arrive all, in order, numbered without gaps."""
    from cfn_core.messages import decode

    senders, per_sender, depth = 4, 300, 40
    bus = ShmBus.create(str(bus_root), inbox_depth=depth)
    bus.listen("r1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _SENDER, str(bus.run_dir), f"s{i}", str(per_sender), str(depth)])
        for i in range(senders)
    ]
    try:
        counts = bus._count_map("inbox/r1")
        got: dict[str, list[int]] = {f"s{i}": [] for i in range(senders)}
        most = 0
        total = senders * per_sender
        received = 0
        deadline = time.monotonic() + 120
        while received < total:
            assert time.monotonic() < deadline, f"only {received} of {total} arrived"
            # let the senders fill the inbox up to the depth (or to what is left) before reading
            if counts[0] - counts[1] < min(depth, total - received) and all(p.poll() is None for p in procs):
                bus.wait("r1", 0.5)
                continue
            records = bus.read("r1", "inbox/r1")
            most = max(most, len(records))
            assert len(records) <= depth, f"{len(records)} unsettled records with inbox_depth = {depth}"
            for raw, _ in records:
                msg = decode(raw)
                got[msg.src].append(msg.seq)
            bus.ack("r1", [r for _, r in records])
            received += len(records)
        assert most == depth  # the senders really were held back at the limit
        print(f"\ninbox depth {depth}, {senders} senders x {per_sender}: most unsettled seen {most}")
        for name, seqs in got.items():
            assert seqs == list(range(1, per_sender + 1)), name
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        bus.destroy()


@pytest.mark.parametrize("plugins", plugin_params())
def test_backpressure_slows_a_coordination_but_loses_nothing(make_config, no_leaks, plugins):
    """Depth 3 with 40 tasks for 2 agents: the coordinator waits for room, every task completes."""
    tables = {"workload": {"agents": 2, "tasks": 40}, "bus": {"inbox_depth": 3}}
    if "pool" in plugins:
        tables["pool"] = {"size": 2}
    with Coordinator(make_config(plugins=plugins, **tables)) as coord:
        result = coord.run()
    assert result.ok and result.delivered == result.planned == 80


def test_mesh_that_cannot_fit_in_the_inbox_depth_is_refused(make_config, no_leaks):
    config = make_config(
        workload={"agents": 3, "topology": "mesh", "messages_per_agent": 20}, bus={"inbox_depth": 10}
    )
    # refused when the coordinator is made, before a single agent is spawned (cfn run: exit 2)
    with pytest.raises(ConfigError, match=r"must hold \d+ peer messages at once.*inbox_depth = 10"):
        Coordinator(config)


# ---------------------------------------------------------------------- agent count


def test_agent_count_over_max_agents_is_refused(make_config):
    config = make_config(workload={"agents": 50}, run={"max_agents": 20})
    with pytest.raises(ConfigError, match=r"\[workload\] agents = 50 exceeds \[run\] max_agents = 20"):
        Coordinator(config)


def test_cli_agent_count_limit_is_one_line_exit_2(bus_root, tmp_path):
    done = subprocess.run(
        [CFN, "run", "--agents", "50", "--set", "run.max_agents=20", "--set", f"bus.root={bus_root}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cfn: error: [workload] agents = 50 exceeds [run] max_agents = 20; raise max_agents if you mean it"
    ]


def test_agent_count_beyond_the_schema_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"\[workload\] agents = 200000: must be an integer from 1 to 100000"):
        make_config(workload={"agents": 200_000})
    with pytest.raises(ConfigError, match=r"agents = 0: must be an integer from 1"):
        make_config(workload={"agents": 0})
