"""The /dev/shm bus: ordering, concurrent senders, no loss, unique ids, accounting, cursors, torn tails.

Concurrent senders are real processes (fresh interpreters) released together
through a pipe, so their appends really overlap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from types import SimpleNamespace

import orjson
import pytest

from cfn_core.builtin import decode_records
from cfn_core.bus.shm import ShmBus
from cfn_core.config import config_from_dict
from cfn_core.errors import MessageTooLarge
from cfn_core.messages import MalformedMessage, Message, MessageFactory, decode

SENDER = textwrap.dedent(
    """
    import sys
    from cfn_core.bus.shm import ShmBus
    from cfn_core.messages import MessageFactory

    run, sender, dst, count, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    bus = ShmBus.attach(run)
    factory = MessageFactory(sender)
    location = "inbox/" + dst
    print("ready", flush=True)
    sys.stdin.readline()  # released by the test together with the other senders
    sent = 0
    while sent < count:
        n = min(batch, count - sent)
        records = [factory.make(dst, "peer", body={"batch": sent // batch}).encode() for _ in range(n)]
        bus.deliver(dst, location, records)
        sent += n
    bus.close()
    """
)


@pytest.fixture
def bus(bus_root):
    bus = ShmBus.create(str(bus_root))
    yield bus
    bus.destroy()


def ctx_for(bus, max_message_bytes=1 << 20):
    """The little a bus reader needs from a context (decode_records' contract)."""
    config = config_from_dict({"bus": {"max_message_bytes": max_message_bytes}}, plugin_schemas={})
    return SimpleNamespace(bus=bus, config=config, counters=defaultdict(int))


def run_senders(bus, dst, senders: dict[str, tuple[int, int]]):
    """Start one process per sender (name -> (count, batch)), release them at once, collect on ``dst``."""
    bus.listen(dst)
    procs = []
    for name, (count, batch) in senders.items():
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SENDER, str(bus.run_dir), name, dst, str(count), str(batch)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    expected = sum(c for c, _ in senders.values())
    records = []
    deadline = time.monotonic() + 120
    while len(records) < expected and time.monotonic() < deadline:
        got = bus.read(dst, f"inbox/{dst}")  # reads race with appends on purpose
        records.extend(got)
        if not got:
            bus.wait(dst, 1.0)
    for p in procs:
        p.stdin.close()
        p.stdout.close()
        assert p.wait(timeout=60) == 0
    records.extend(bus.read(dst, f"inbox/{dst}"))
    return records


def test_concurrent_senders_lose_nothing_and_keep_their_order(bus):
    senders = {f"s{i}": (1500, 1) for i in range(4)}
    records = run_senders(bus, "sink", senders)
    msgs = [decode(raw) for raw, _ in records]
    assert len(msgs) == 6000
    assert len({m.id for m in msgs}) == 6000  # unique ids
    by_sender = defaultdict(list)
    for m in msgs:
        by_sender[m.src].append(m.seq)
    for name, (count, _) in senders.items():
        assert by_sender[name] == list(range(1, count + 1)), f"{name}: out of order or gaps"
    # receipts are strictly increasing offsets: each record is read exactly once
    receipts = [r for _, r in records]
    assert receipts == sorted(set(receipts))


def test_thousands_in_the_same_millisecond_batched_and_atomic(bus):
    # four processes each land 5,000 messages in batches of 250; ids carry no timestamp, so
    # messages made in the same millisecond (most of them here) cannot collide
    senders = {f"b{i}": (5000, 250) for i in range(4)}
    records = run_senders(bus, "sink", senders)
    msgs = [decode(raw) for raw, _ in records]
    assert len(msgs) == 20000
    assert len({m.id for m in msgs}) == 20000
    per_ms = defaultdict(int)
    for m in msgs:
        per_ms[int(m.ts * 1000)] += 1
    assert max(per_ms.values()) > 1  # many really did share a millisecond
    # atomic multi-record deliver: every batch is contiguous in the inbox, never interleaved
    runs = []
    for m in msgs:
        key = (m.src, m.body["batch"])
        if not runs or runs[-1][0] != key:
            runs.append([key, 0])
        runs[-1][1] += 1
    assert len(runs) == 4 * 20
    assert all(n == 250 for _, n in runs)
    for name in senders:
        assert [m.seq for m in msgs if m.src == name] == list(range(1, 5001))


def test_accounting_every_record_is_delivered_or_dead_lettered(bus):
    factory = MessageFactory("acct")
    good = bad = 0
    for i in range(200):
        if i % 7 == 3:
            bus.deliver("a1", "inbox/a1", [b"not json at all\n"])
            bad += 1
        elif i % 11 == 5:
            bus.deliver("a1", "inbox/a1", [b'{"id": 5, "kind": "task"}\n'])  # JSON, but not a message
            bad += 1
        else:
            bus.deliver("a1", "inbox/a1", [factory.make("a1", "task", task=f"t{i}").encode()])
            good += 1
    ctx = ctx_for(bus)
    reader = ShmBus.attach(bus.run_dir)
    msgs = decode_records(ctx, "a1", reader.read("a1", "inbox/a1"))
    assert len(msgs) == good
    assert ctx.counters["dead_lettered"] == bad
    assert reader.dead_letter_count() == bad
    reasons = [d["reason"] for d in reader.dead_letters()]
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("field 'id'" in r for r in reasons)
    assert good + bad == 200
    reader.close()


def test_ack_cursor_second_reader_rereads_exactly_the_unacked(bus):
    factory = MessageFactory("c")
    sent = [factory.make("a1", "task", task=f"t{i}") for i in range(10)]
    for m in sent:
        bus.deliver("a1", "inbox/a1", [m.encode()])

    first = ShmBus.attach(bus.run_dir)
    got = first.read("a1", "inbox/a1")
    assert [decode(r).id for r, _ in got] == [m.id for m in sent]
    first.ack("a1", [rc for _, rc in got[:3]])
    first.close()  # the agent died here

    second = ShmBus.attach(bus.run_dir)
    again = second.read("a1", "inbox/a1")
    assert [decode(r).id for r, _ in again] == [m.id for m in sent[3:]]
    assert second.unread_bytes("a1", "inbox/a1") == sum(len(r) for r, _ in again)
    # an ack out of order does not move the cursor past an unsettled record
    second.ack("a1", [again[2][1]])
    second.close()
    third = ShmBus.attach(bus.run_dir)
    assert [decode(r).id for r, _ in third.read("a1", "inbox/a1")] == [m.id for m in sent[3:]]
    third.close()
    # once the gap is settled the cursor moves over the whole settled prefix
    fourth = ShmBus.attach(bus.run_dir)
    recs = fourth.read("a1", "inbox/a1")
    fourth.ack("a1", [recs[2][1]])
    fourth.ack("a1", [recs[0][1], recs[1][1]])
    fourth.close()
    fifth = ShmBus.attach(bus.run_dir)
    assert [decode(r).id for r, _ in fifth.read("a1", "inbox/a1")] == [m.id for m in sent[6:]]
    assert fifth.read("a1", "inbox/a1") == []  # a reader never returns a record twice
    fifth.close()


def test_kept_directory_descriptors_survive_nothing_they_should_not(bus):
    """Directories are opened once per process; a removed one is an error naming it, not a crash or a loss."""
    from cfn_core.errors import BusError

    sender = ShmBus.attach(bus.run_dir)
    before = len(os.listdir("/proc/self/fd"))
    sender.deliver("a1", "shard-1/a1", [MessageFactory("c").make("a1", "task").encode()])
    kept = len(os.listdir("/proc/self/fd")) - before
    assert kept == 4  # the run directory, shard-1, the inbox, the ringing socket
    sender.deliver("a2", "shard-1/a2", [MessageFactory("c").make("a2", "task").encode()])
    assert len(os.listdir("/proc/self/fd")) - before == 5  # one more inbox, no more directories
    # the directory goes away under the sender: a new inbox there is a clear error
    for name in os.listdir(bus.run_dir / "shard-1"):
        os.unlink(bus.run_dir / "shard-1" / name)
    os.rmdir(bus.run_dir / "shard-1")
    with pytest.raises(BusError, match="shard-1/a3: its directory was removed"):
        sender.deliver("a3", "shard-1/a3", [b"{}\n"])
    # ... and once it exists again, the sender opens it afresh and the message arrives
    os.mkdir(bus.run_dir / "shard-1", 0o700)
    msg = MessageFactory("c").make("a3", "task")
    sender.deliver("a3", "shard-1/a3", [msg.encode()])
    reader = ShmBus.attach(bus.run_dir)
    assert [decode(r).id for r, _ in reader.read("a3", "shard-1/a3")] == [msg.id]
    reader.close()
    sender.close()
    assert len(os.listdir("/proc/self/fd")) == before  # close() closes the kept directories too


def test_settling_thousands_of_held_records_at_once_moves_the_cursor_over_all(bus):
    """Held records (a mesh task's peers) settled together, in any order: the cursor ends after the last."""
    records = [MessageFactory("c").make("a1", "peer").encode() for _ in range(5000)]
    bus.deliver("a1", "inbox/a1", records)
    reader = ShmBus.attach(bus.run_dir)
    got = reader.read("a1", "inbox/a1")
    receipts = [r for _, r in got]
    reader.ack("a1", receipts[1::2])  # every second one first: nothing may move
    assert reader.unread_bytes("a1", "inbox/a1") == sum(len(r) for r in records)
    reader.ack("a1", receipts[0::2])
    assert reader.unread_bytes("a1", "inbox/a1") == 0
    reader.close()


def test_reader_never_takes_a_partial_record(bus):
    path = bus.run_dir / "inbox" / "a1"
    bus.deliver("a1", "inbox/a1", [MessageFactory("x").make("a1", "task").encode()])
    with open(path, "ab") as f:
        f.write(b'{"id": "half-writ')  # a write in progress
    reader = ShmBus.attach(bus.run_dir)
    assert len(reader.read("a1", "inbox/a1")) == 1
    assert reader.read("a1", "inbox/a1") == []
    reader.close()


def test_torn_tail_is_closed_by_the_next_sender_and_dead_lettered(bus):
    path = bus.run_dir / "inbox" / "a1"
    path.parent.mkdir(exist_ok=True)
    with open(path, "ab") as f:
        f.write(b'{"id": "dead.1.1", "src": "dead", "dst": "a1", "ki')  # its sender was SIGKILLed mid-write
    intact = MessageFactory("alive").make("a1", "task", task="t1", body={"payload": "ok"})
    bus.deliver("a1", "inbox/a1", [intact.encode()])
    assert path.read_bytes().count(b"\n") == 2

    reader = ShmBus.attach(bus.run_dir)
    ctx = ctx_for(reader)
    msgs = decode_records(ctx, "a1", reader.read("a1", "inbox/a1"))
    assert [m.id for m in msgs] == [intact.id]
    assert msgs[0].body == {"payload": "ok"}
    assert ctx.counters["dead_lettered"] == 1
    dead = reader.dead_letters()
    assert len(dead) == 1 and dead[0]["agent"] == "a1"
    # the fragment was settled when it was dead-lettered: only the intact record is left unacked
    reader.ack("a1", [msgs[0].receipt])
    assert reader.unread_bytes("a1", "inbox/a1") == 0
    reader.close()


def test_multi_record_deliver_is_one_write_in_order(bus):
    factory = MessageFactory("m")
    batch = [factory.make("a1", "peer", body=i) for i in range(50)]
    bus.deliver("a1", "inbox/a1", [m.encode() for m in batch])
    reader = ShmBus.attach(bus.run_dir)
    assert [decode(r).body for r, _ in reader.read("a1", "inbox/a1")] == list(range(50))
    reader.close()


def test_doorbell_wakes_a_sleeping_reader_from_another_process(bus):
    bus.listen("a1")
    assert bus.wait("a1", 0) is False  # nothing pending
    code = (
        "import sys; from cfn_core.bus.shm import ShmBus; from cfn_core.messages import MessageFactory;"
        "b = ShmBus.attach(sys.argv[1]); b.deliver('a1', 'inbox/a1', [MessageFactory('w').make('a1', 'ping').encode()])"
    )
    subprocess.run([sys.executable, "-c", code, str(bus.run_dir)], check=True, timeout=60)
    assert bus.wait("a1", 30) is True
    assert len(bus.read("a1", "inbox/a1")) == 1


def test_every_append_after_a_wake_up_wakes_the_reader_again(bus):
    # the agent loop reads once per wake-up and sleeps: it relies on this
    bus.listen("a1")
    sender = ShmBus.attach(bus.run_dir)
    make = MessageFactory("w").make
    try:
        sender.deliver("a1", "inbox/a1", [make("a1", "ping").encode()])
        assert bus.wait("a1", None) is True  # the blocking wait
        assert len(bus.read("a1", "inbox/a1")) == 1
        assert bus.wait("a1", 0) is False  # that ring was consumed: nothing pending
        sender.deliver("a1", "inbox/a1", [make("a1", "ping").encode()])  # appended after the read
        assert bus.wait("a1", 0) is True  # rang again: a sleeping reader would wake
        assert len(bus.read("a1", "inbox/a1")) == 1
        assert bus.read("a1", "inbox/a1") == []
    finally:
        sender.close()


def test_a_ring_is_delivered_when_the_senders_buffer_is_full_of_unread_rings(bus):
    # every unread datagram stays charged to its sender: ringing hundreds of receivers that
    # do not read (busy agents) fills the sender's buffer, and a ring then got EAGAIN and was
    # lost (an agent slept on its task until the watchdog killed it)
    receivers = [f"r{i}" for i in range(600)]
    for r in receivers + ["last"]:
        bus.listen(r)
    sender = ShmBus.attach(bus.run_dir)
    try:
        for r in receivers:
            sender.ring(r)  # none of them reads
        sender.ring("last")
        assert bus.wait("last", 0) is True  # the ring arrived
        assert all(bus.wait(r, 0) for r in receivers)  # as did every other one
        assert sender.rings_retried > 0  # because the full buffer was noticed and replaced
    finally:
        sender.close()


def test_a_receivers_full_queue_is_a_pending_wake_up_not_a_reason_for_a_new_socket(bus):
    bus.listen("busy")
    sender = ShmBus.attach(bus.run_dir)
    try:
        for _ in range(50):  # far more than the receiver's queue holds (net.unix.max_dgram_qlen)
            sender.ring("busy")
        assert sender.rings_retried == 0  # EAGAIN from its queue: the socket was kept
        assert bus.wait("busy", 0) is True
    finally:
        sender.close()


def test_message_ids_are_unique_without_relying_on_the_clock():
    factory = MessageFactory("a1")
    msgs = [factory.make("x", "peer") for _ in range(10000)]
    assert len({m.id for m in msgs}) == 10000
    assert msgs[0].id == f"a1.{os.getpid()}.1"  # sender, incarnation (pid), sequence
    assert [m.seq for m in msgs] == list(range(1, 10001))


def test_oversized_message_is_refused_with_a_clear_error():
    msg = Message(id="c.1.1", src="_coordinator", dst="agent-0001", kind="task", body="x" * 5000)
    with pytest.raises(MessageTooLarge) as info:
        msg.encode(limit=1024)
    text = str(info.value)
    assert "message c.1.1 (task from _coordinator to agent-0001)" in text
    assert "bus.max_message_bytes allows 1024" in text


def test_record_over_the_limit_on_read_is_dead_lettered(bus):
    big = Message(id="c.1.1", src="x", dst="a1", kind="task", body="y" * 4000).encode()
    bus.deliver("a1", "inbox/a1", [big])
    ctx = ctx_for(bus, max_message_bytes=1024)
    assert decode_records(ctx, "a1", bus.read("a1", "inbox/a1")) == []
    assert "exceeds bus.max_message_bytes=1024" in bus.dead_letters()[0]["reason"]


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"id": "a", "src": "b", "dst": "c", "kind": "evil", "round": 0}\n', "unknown kind 'evil'"),
        (b'{"id": "a", "src": "b", "dst": "c", "kind": "task", "round": true}\n', "field 'round'"),
        (b'{"id": "a", "src": "b", "dst": "c", "kind": "task", "round": 0, "seq": "1"}\n', "field 'seq'"),
    ],
)
def test_decode_names_what_is_wrong(raw, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode(raw)


def test_wire_format_is_one_json_line():
    msg = MessageFactory("a").make("b", "result", task="t\n1", body={"text": "line1\nline2"})
    raw = msg.encode()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # newlines inside strings are escaped
    assert orjson.loads(raw)["body"] == {"text": "line1\nline2"}
    assert decode(raw) == msg
