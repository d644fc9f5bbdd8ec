"""Issue 13, items 4, 7, 8, 9 and 11: no record kills an agent, nothing runs twice, no record is read whole.

Real agents (OS processes) on a real /dev/shm bus; hostile records are written
straight into their inboxes, and the interrupt test sends a real SIGTERM to a
real coordinator process.

* 4: a task record written twice runs once (agents de-duplicate task records by
  message id); cfn-batch does not write again what an interrupted deliver wrote.
* 7: a ping from ``../../x``, ``x/y`` or a 300-character id, a task whose peers
  are such ids: dead-lettered and settled with the reason, the agent lives on,
  no innocent task is charged, and no message field becomes a path.
* 8: a peer message the bus refuses fails its task with the reason (the agent
  lives on), and its receiver gets an empty body instead of waiting out its timeout.
* 9: a handler exception whose ``str()`` raises fails the task, not the agent.
* 11: a record over ``max_message_bytes`` is skipped in chunks and dead-lettered
  without being read whole; a torn tail is read once, not on every read.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import HERE, fault_env, plugin_params, read_log  # noqa: E402,F401

from cfn_core import Coordinator, Message, hookimpl  # noqa: E402
from cfn_core.bus.shm import ShmBus  # noqa: E402
from cfn_core.messages import decode  # noqa: E402


def _tables(plugins, agents, **workload):
    tables = {"workload": {"agents": agents, **workload}}
    if "pool" in plugins:
        tables["pool"] = {"size": agents}
    return tables


def _payloads(scratch, n, marked=None):
    """``n`` payloads logging to ``scratch``; ``marked`` adds keys to some: ``{index: {...}}``."""
    marked = marked or {}
    return [{"key": f"k{i}", "dir": str(scratch), **marked.get(i, {})} for i in range(n)]


def _starts(scratch) -> dict[str, int]:
    counts: dict[str, int] = {}
    for what, key, _pid in read_log(scratch):
        if what == "start":
            counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------- 7: hostile ids


_BAD_IDS = ["../../x", "x/y", "a" * 300, "", ".."]


class _HostileRecords:
    """Writes records carrying bad ids into each agent's inbox as soon as it is ready."""

    def __init__(self):
        self.agents = []

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        self.agents.append(agent.id)
        number = ctx._round.number if ctx._round is not None else 1
        records = []
        for i, bad in enumerate(_BAD_IDS):
            records.append(Message(id=f"evil.1.p{i}", src=bad, dst=agent.id, kind="ping", round=number, body=i).encode())
            records.append(
                Message(
                    id=f"evil.1.t{i}", src="evil", dst=agent.id, kind="task", round=number, task=f"evil-{i}",
                    body={"payload": {"key": f"evil-{i}"}, "peers": [bad], "expect": 0},
                ).encode()
            )
        records.append(
            Message(id="evil.1.s", src="evil", dst=agent.id, kind="task", round=number, task="evil-str",
                    body={"payload": {"key": "evil-str"}, "peers": "agent-0001", "expect": 0}).encode()
        )
        ctx.bus.deliver(agent.id, ctx.route(agent.id), records)


@pytest.mark.parametrize("plugins", plugin_params())
def test_records_with_bad_ids_are_dead_lettered_never_fatal(make_config, fault_env, bus_root, no_leaks, plugins):
    agents = 3
    config = make_config(plugins=plugins, **_tables(plugins, agents, handler="records_handlers:echo_key", max_attempts=3))
    hostile = _HostileRecords()
    with Coordinator(config, extra_plugins=[hostile]) as coord:
        result = coord.run(_payloads(fault_env, 9))
        dead = coord.ctx.bus.dead_letters()
        run_dir = coord.ctx.bus.run_dir
        planted = sorted(
            p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.name in ("x", "y") or p.name.startswith("aaaa")
        )
    rnd = result.rounds[0]
    assert hostile.agents
    # no agent died: no task was charged, retried or handed over
    assert result.ok, {t: r.error for t, r in result.results.items() if not r.ok}
    assert rnd.retries == 0
    assert all(r.attempts == 1 for r in result.results.values())
    assert _starts(fault_env) == {f"k{i}": 1 for i in range(9)}  # the hostile tasks never ran a handler
    # every hostile record was dead-lettered with its reason, by every agent that got it
    by_record: dict[str, list[str]] = {}
    for d in dead:
        by_record.setdefault(decode(base64.b64decode(d["raw_b64"])).id, []).append(d["reason"])
    n = len(hostile.agents)
    for i in range(len(_BAD_IDS)):
        assert len(by_record[f"evil.1.p{i}"]) == n and all(
            r.startswith("ping not answered: agent id") for r in by_record[f"evil.1.p{i}"]
        ), by_record[f"evil.1.p{i}"]
        assert len(by_record[f"evil.1.t{i}"]) == n and all(
            r.startswith(f"task evil-{i}: cannot send to peer") for r in by_record[f"evil.1.t{i}"]
        ), by_record[f"evil.1.t{i}"]
    assert by_record["evil.1.s"] == ["task evil-str: 'peers' must be a list of agent ids, not 'agent-0001'"] * n
    assert max(len(r) for rs in by_record.values() for r in rs) < 400  # a 300-character id is not quoted whole
    # no message field became a path: no inbox/x/y, nothing outside the run directory
    assert planted == []
    assert sorted(p.name for p in bus_root.iterdir()) == []


def test_the_bus_refuses_destinations_that_are_not_inbox_ids(bus_root):
    from cfn_core import BusError

    bus = ShmBus.create(str(bus_root))
    try:
        for dst in ("x/y", "../x", "a" * 300, "", ".."):
            with pytest.raises(BusError, match="is not an inbox id"):
                bus.deliver(dst, "inbox/agent-0001", [b"{}\n"])
        for location in ("inbox/x/y/../z", "inbox/" + "a" * 300, "inbox//a", "inbox/a b"):
            with pytest.raises(BusError, match="escapes the run directory|is not plain names"):
                bus.deliver("agent-0001", location, [b"{}\n"])
        assert sorted(os.listdir(bus.run_dir)) == ["bell", "count", "cursor", "dead", "owner.json", "state"]
        bus.deliver("_coordinator", "shard-3/_coordinator", [b"{}\n"])  # kernel inboxes and shard directories are fine
    finally:
        bus.destroy()


# ---------------------------------------------------------------------- 9: str() raises


@pytest.mark.parametrize("plugins", plugin_params())
def test_an_exception_whose_str_raises_fails_the_task_not_the_agent(make_config, fault_env, no_leaks, plugins):
    config = make_config(plugins=plugins, **_tables(plugins, 2, handler="records_handlers:broken_str"))
    with Coordinator(config) as coord:
        result = coord.run(_payloads(fault_env, 6, {1: {"broken": True}}))
    rnd = result.rounds[0]
    failed = {t: r for t, r in result.results.items() if not r.ok}
    assert list(failed) == ["r1-t000001"]
    assert failed["r1-t000001"].error == "BadStr: (its str() raised RuntimeError)"
    assert failed["r1-t000001"].attempts == 1 and rnd.retries == 0
    assert _starts(fault_env) == {f"k{i}": 1 for i in range(6)}


# ---------------------------------------------------------------------- 8: peer sends that fail


@pytest.mark.parametrize("plugins", plugin_params())
def test_a_peer_message_the_bus_refuses_fails_its_task_not_the_agent(make_config, fault_env, no_leaks, plugins):
    agents = 4
    limit = 64 * 1024
    config = make_config(
        plugins=plugins,
        **_tables(plugins, agents, handler="records_handlers:mesh", topology="mesh", messages_per_agent=2, max_attempts=3),
        bus={"max_message_bytes": limit},
    )
    with Coordinator(config) as coord:
        result = coord.run(_payloads(fault_env, agents, {0: {"big": 2 * limit}}))
    rnd = result.rounds[0]
    failed = {t: r for t, r in result.results.items() if not r.ok}
    assert list(failed) == ["r1-t000000"], {t: r.error for t, r in result.results.items()}
    error = failed["r1-t000000"].error
    assert error.startswith("peer message not sent: message ") and f"bus.max_message_bytes allows {limit}" in error
    assert error.endswith("its receiver got an empty body")
    assert failed["r1-t000000"].attempts == 1 and rnd.retries == 0  # the agent lived on
    assert _starts(fault_env) == {f"k{i}": 1 for i in range(agents)}
    # its receivers got empty bodies instead of waiting out their timeout
    empties = sum(r.value["empty"] for r in result.results.values() if r.ok)
    assert empties == 2
    assert all(r.value["bodies"] == r.peers_received for r in result.results.values() if r.ok)


# ---------------------------------------------------------------------- 4: nothing runs twice


class _WritesTasksTwice:
    """The coordinator's bus writes every batch holding a task twice (as a re-sent batch would)."""

    def __init__(self):
        self.doubled = 0

    @hookimpl
    def cfn_session_start(self, ctx):
        bus = ctx.bus
        real = bus.deliver

        def deliver(dst, location, records):
            real(dst, location, records)
            if any(decode(r).kind == "task" for r in records):
                real(dst, location, records)
                self.doubled += 1

        bus.deliver = deliver


@pytest.mark.parametrize("plugins", plugin_params())
def test_a_task_record_written_twice_runs_once(make_config, fault_env, no_leaks, plugins):
    config = make_config(plugins=plugins, **_tables(plugins, 2, handler="records_handlers:echo_key"))
    doubler = _WritesTasksTwice()
    with Coordinator(config, extra_plugins=[doubler]) as coord:
        result = coord.run(_payloads(fault_env, 6))
        again = coord.run(_payloads(fault_env, 6))  # the same task ids next run: they run again
    assert doubler.doubled
    for res in (result, again):
        assert res.ok
        assert res.rounds[0].duplicates == 0  # the agents never answered a task twice
    assert _starts(fault_env) == {f"k{i}": 2 for i in range(6)}  # once per run, never twice in one


_INTERRUPTED_COORDINATOR = r"""
import json, os, signal, sys
from cfn_core import Coordinator, config_from_dict, hookimpl
from cfn_core.cli import Terminated, _on_signal
from cfn_core.messages import decode

scratch, root = sys.argv[1], sys.argv[2]
config = config_from_dict({
    "plugins": ["batch"],
    "workload": {"agents": 2, "handler": "records_handlers:echo_key"},
    "bus": {"root": root},
    "batch": {"size": 50, "timeout_ms": 60000},
})
written = []

class InterruptAfterWrite:
    @hookimpl
    def cfn_session_start(self, ctx):
        real = ctx.bus.deliver
        def deliver(dst, location, records):
            real(dst, location, records)
            tasks = [decode(r).task for r in records if decode(r).kind == "task"]
            written.extend(tasks)
            if tasks and len(written) == len(tasks):
                # the first task batch is on the bus: SIGTERM now, before the batcher records it
                # (the handler raises as os.kill returns)
                os.kill(os.getpid(), signal.SIGTERM)
        ctx.bus.deliver = deliver

signal.signal(signal.SIGTERM, _on_signal)
payloads = [{"key": f"k{i}", "dir": scratch} for i in range(6)]
code = 0
try:
    with Coordinator(config, extra_plugins=[InterruptAfterWrite()]) as coord:
        coord.run(payloads)
except Terminated:
    code = 143
print(json.dumps({"written": written, "code": code}))
"""


def test_an_interrupt_after_a_batch_was_written_does_not_write_it_again(fault_env, bus_root, no_leaks):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_COORDINATOR, str(fault_env), str(bus_root)],
        capture_output=True, text=True, timeout=300, env=env, cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["code"] == 143
    # every task record written once, though the coordinator was interrupted right after writing
    # them and its shutdown flushed the batcher
    assert sorted(out["written"]) == sorted(set(out["written"])), out["written"]
    starts = _starts(fault_env)
    assert all(n == 1 for n in starts.values()), starts


# ---------------------------------------------------------------------- 11: no record read whole


def _rchar() -> int:
    """Bytes this process has read through read()/pread() so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _msg(i: int, size: int = 0) -> bytes:
    return Message(id=f"s.1.{i}", src="s", dst="a1", kind="peer", body="y" * size).encode()


def test_an_oversized_record_is_skipped_and_dead_lettered_without_being_read_whole(bus_root):
    import tracemalloc

    huge = 64 << 20  # 64 MiB; the bus allows 1 MiB
    bus = ShmBus.create(str(bus_root))
    try:
        bus.deliver("a1", "inbox/a1", [_msg(1)])
        with open(bus.run_dir / "inbox" / "a1", "ab") as f:  # as a hostile or buggy writer would
            f.write(b'{"id":"x"' + b" " * huge + b"}\n")
        # and inside a batch: the records around it are whole messages
        bus.deliver("a1", "inbox/a1", [_msg(2), b'{"big":"' + b"z" * (3 << 20) + b'"}\n', _msg(3, 200_000)])
        tracemalloc.start()
        try:
            got = bus.read("a1", "inbox/a1")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [decode(raw).id for raw, _ in got] == ["s.1.1", "s.1.2", "s.1.3"]
        assert peak < 8 << 20, f"the reader held {peak} bytes at once"
        dead = bus.dead_letters()
        assert [d["reason"].split(";")[0] for d in dead] == [
            f"record of {huge + 11} bytes exceeds bus.max_message_bytes={1 << 20}",
            f"record of {(3 << 20) + 11} bytes exceeds bus.max_message_bytes={1 << 20}",
        ]
        assert all(len(base64.b64decode(d["raw_b64"])) == 4096 for d in dead)
        bus.ack("a1", [r for _, r in got])
        # settled: a replacement re-reads nothing, and the next message arrives as usual
        bus.deliver("a1", "inbox/a1", [_msg(4)])
        again = ShmBus.attach(bus.run_dir)
        try:
            assert [decode(raw).id for raw, _ in again.read("a1", "inbox/a1")] == ["s.1.4"]
        finally:
            again.close()
    finally:
        bus.destroy()


def test_a_torn_tail_is_read_once_not_on_every_read(bus_root):
    bus = ShmBus.create(str(bus_root))
    try:
        bus.deliver("a1", "inbox/a1", [_msg(1)])
        tail = 32 << 20
        with open(bus.run_dir / "inbox" / "a1", "ab") as f:  # a writer that died half way through
            f.write(b'{"id":"torn","pad":"' + b"t" * tail)
        assert [decode(raw).id for raw, _ in bus.read("a1", "inbox/a1")] == ["s.1.1"]
        before = _rchar()
        for _ in range(20):
            assert bus.read("a1", "inbox/a1") == []
        assert _rchar() - before < 20 * 2 * (64 << 10), "the torn tail was read again"
        # the next sender repairs the tail (a marker record in its place), which the reader notices
        bus.deliver("a1", "inbox/a1", [_msg(2)])
        raws = [raw for raw, _ in bus.read("a1", "inbox/a1")]
        assert raws[0].startswith(b"\x1ftorn write") and [decode(r).id for r in raws[1:]] == ["s.1.2"]
    finally:
        bus.destroy()


def test_large_reads_return_every_record_whole_and_in_order(bus_root):
    """Records up to the limit and batches longer than the read chunk, in random sizes."""
    import random

    rng = random.Random(13)
    bus = ShmBus.create(str(bus_root))
    try:
        sent = []
        i = 0
        for _ in range(60):
            batch = []
            for _ in range(rng.choice([1, 1, 3, 40])):
                i += 1
                batch.append(_msg(i, rng.choice([10, 1000, 70_000, 300_000, (1 << 20) - 200])))
            bus.deliver("a1", "inbox/a1", batch)
            sent += batch
        got = []
        while len(got) < len(sent):
            records = bus.read("a1", "inbox/a1")
            assert records, "a read returned nothing with records unread"
            got += records
        assert [raw for raw, _ in got] == sent
        ends = [r for _, r in got]
        assert ends == sorted(ends) and ends[-1] == os.path.getsize(bus.run_dir / "inbox" / "a1")
        assert bus.dead_letters() == []
    finally:
        bus.destroy()


class _HugeRecords:
    """Writes a record of 64 MiB into each agent's inbox, and into the coordinator's, as each agent starts."""

    def __init__(self):
        self.count = 0

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        for who in (agent.id, "_coordinator"):
            with open(ctx.bus.run_dir / ctx.route(who), "ab") as f:  # a MiB at a time: not held here either
                # under the inbox's flock, as every sender writes: agents append their records to
                # the coordinator's inbox meanwhile, and an unlocked writer's 65 writes would
                # swallow them (a lost ready record or result: CI saw the run wait out timeouts)
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(b'{"id":"h","pad":"')
                for _ in range(64):
                    f.write(b"h" * (1 << 20))
                f.write(b'"}\n')
            ctx.bus.ring(who)
            self.count += 1


@pytest.mark.parametrize("plugins", plugin_params())
def test_agents_and_the_coordinator_skip_a_huge_record_and_carry_on(make_config, fault_env, no_leaks, plugins):
    config = make_config(plugins=plugins, **_tables(plugins, 2, handler="records_handlers:peak_rss"))
    huge = _HugeRecords()
    with Coordinator(config, extra_plugins=[huge]) as coord:
        result = coord.run(_payloads(fault_env, 4))
        dead = coord.ctx.bus.dead_letters()
    assert huge.count >= 2
    assert result.ok and result.rounds[0].retries == 0
    assert sum("exceeds bus.max_message_bytes" in d["reason"] for d in dead) == huge.count
    # no agent ever held the 64 MiB record (reading it whole took twice that)
    assert max(r.value for r in result.results.values()) < 100 << 20
