"""The original bash bus's acceptance behaviours, on the real /dev/shm bus with real processes.

* per-sender ordering, and concurrent senders each numbered without gaps;
* unique ids under same-millisecond bursts (also across processes and incarnations);
* a multi-hop relay A -> B -> C through three processes;
* shutdown drains in-flight messages: work queued before ``stop`` is done before the agent exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import plugin_params  # noqa: E402

from cfn_core import Coordinator  # noqa: E402
from cfn_core.bus.shm import ShmBus  # noqa: E402
from cfn_core.messages import MessageFactory, decode  # noqa: E402

_SENDER = textwrap.dedent(
    """
    import os
    import sys
    from cfn_core.bus.shm import ShmBus
    from cfn_core.messages import MessageFactory
    run_dir, name, count, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bus = ShmBus.attach(run_dir)
    factory = MessageFactory(name)
    print("ready", flush=True)
    sys.stdin.readline()  # "go" comes once every sender is ready: they really send side by side
    sent = 0
    while sent < count:
        n = min(batch, count - sent)
        bus.deliver("sink", "inbox/sink", [factory.make("sink", "peer", body={"n": sent + i}).encode() for i in range(n)])
        sent += n
        os.sched_yield()  # a sender this fast would finish within one time slice: let the others in
    bus.close()
    """
)


def _drain(bus, agent_id, want, timeout=120.0):
    """Read ``want`` messages from ``agent_id``'s inbox, sleeping on its doorbell in between."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} arrived"
        records = bus.read(agent_id, f"inbox/{agent_id}")
        if not records:
            bus.wait(agent_id, 0.5)
            continue
        got.extend(decode(raw) for raw, _ in records)
        bus.ack(agent_id, [r for _, r in records])
    return got


def test_concurrent_senders_keep_order_and_are_numbered_without_gaps(bus_root, no_leaks):
    senders, per_sender = 4, 500
    bus = ShmBus.create(str(bus_root))
    bus.listen("sink")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(bus.run_dir), f"s{i}", str(per_sender), str(1 + 3 * i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(senders)
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
        got = _drain(bus, "sink", senders * per_sender)
        for p in procs:
            assert p.wait(timeout=60) == 0
        assert bus.read("sink", "inbox/sink") == []  # nothing extra
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
        bus.destroy()
    by_sender: dict[str, list] = {}
    for msg in got:
        by_sender.setdefault(msg.src, []).append(msg)
    assert sorted(by_sender) == [f"s{i}" for i in range(senders)]
    for name, msgs in by_sender.items():
        assert [m.seq for m in msgs] == list(range(1, per_sender + 1)), name  # numbered without gaps, in order
        assert [m.body["n"] for m in msgs] == list(range(per_sender)), name
    assert len({m.id for m in got}) == len(got)
    # the senders really interleaved (otherwise ordering would be trivial)
    switches = sum(1 for a, b in zip(got, got[1:]) if a.src != b.src)
    assert switches > senders


def test_ids_are_unique_in_same_millisecond_bursts():
    factory = MessageFactory("agent-0001")
    msgs = [factory.make("x", "peer") for _ in range(20_000)]
    assert len({m.id for m in msgs}) == len(msgs)
    per_ms = Counter(int(m.ts * 1000) for m in msgs)
    assert max(per_ms.values()) > 50  # many really share a millisecond
    assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))


def test_ids_are_unique_across_processes_and_incarnations():
    """Several processes with the same sender id (a dead agent and its replacements) never collide."""
    script = (
        "import json; from cfn_core.messages import MessageFactory; f = MessageFactory('agent-0001'); "
        "print(json.dumps([f.make('x', 'peer').id for _ in range(2000)]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) for _ in range(4)]
    ids = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        ids.extend(json.loads(out))
    assert len(ids) == 8000 and len(set(ids)) == 8000


_RELAY = textwrap.dedent(
    """
    import json, sys
    from cfn_core.bus.shm import ShmBus
    from cfn_core.messages import MessageFactory, decode
    run_dir, me, nxt = sys.argv[1], sys.argv[2], sys.argv[3]
    bus = ShmBus.attach(run_dir)
    bus.listen(me)
    factory = MessageFactory(me)
    seen = []
    while True:
        records = bus.read(me, "inbox/" + me)
        if not records:
            bus.wait(me, 5.0)
            continue
        out, done = [], False
        for raw, _ in records:
            msg = decode(raw)
            if msg.kind == "stop":
                done = True
                continue
            body = dict(msg.body)
            body["hops"] = body.get("hops", []) + [me]
            seen.append(body)
            out.append(factory.make(nxt, "peer", body=body))
        if nxt != "-" and out:
            bus.deliver(nxt, "inbox/" + nxt, [m.encode() for m in out])
        bus.ack(me, [r for _, r in records])  # settled only once forwarded
        if done:
            if nxt != "-":
                bus.deliver(nxt, "inbox/" + nxt, [factory.make(nxt, "stop").encode()])
            break
    bus.close()
    if nxt == "-":
        print(json.dumps(seen))
    """
)


def test_multi_hop_relay_a_to_b_to_c(bus_root, no_leaks):
    count = 300
    bus = ShmBus.create(str(bus_root))
    # C and B bind their doorbells themselves; A (this process) starts sending at once
    c = subprocess.Popen([sys.executable, "-c", _RELAY, str(bus.run_dir), "C", "-"], stdout=subprocess.PIPE)
    b = subprocess.Popen([sys.executable, "-c", _RELAY, str(bus.run_dir), "B", "C"])
    try:
        a = MessageFactory("A")
        for start in range(0, count, 25):
            bus.deliver("B", "inbox/B", [a.make("B", "peer", body={"n": n}).encode() for n in range(start, start + 25)])
        bus.deliver("B", "inbox/B", [a.make("B", "stop").encode()])
        out, _ = c.communicate(timeout=120)
        assert b.wait(timeout=60) == 0 and c.returncode == 0
    finally:
        for p in (b, c):
            p.kill()
            p.wait()
        bus.destroy()
    seen = json.loads(out)
    assert [x["n"] for x in seen] == list(range(count))  # all of them, in A's order
    assert all(x["hops"] == ["B", "C"] for x in seen)


@pytest.mark.parametrize("plugins", plugin_params())
def test_shutdown_drains_in_flight_messages(make_config, no_leaks, plugins):
    """Tasks queued in the same batch as ``stop`` are all answered before the agent exits."""
    tables = {"workload": {"agents": 1}}
    if "pool" in plugins:
        tables["pool"] = {"size": 0}
    with Coordinator(make_config(plugins=plugins, **tables)) as coord:
        ctx = coord.ctx
        (agent_id,) = ctx.hook.cfn_acquire_agents(ctx=ctx, count=1)
        ctx.wait_ready([agent_id], 60)
        handle = ctx.agents[agent_id]
        assert handle.state == "ready"
        work = [
            ctx.factory.make(agent_id, "task", round=0, task=f"t{i}", body={"payload": i, "peers": [], "expect": 0})
            for i in range(40)
        ]
        before = ctx.counters["stale_results"]
        handle.state = "stopping"
        ctx.send(work + [ctx.factory.make(agent_id, "stop")])
        ctx.hook.cfn_flush(ctx=ctx, reason="explicit")
        ctx._await_exit([handle], 60)
        ctx.pump(0)
        # it stopped by itself (a pooled agent's status is known to its zygote, not to us)
        assert handle.state == "exited" and handle.killed_reason is None
        assert handle.exit_code == (0 if handle.popen is not None else None)
        # every task sent before the stop was answered (outside a round: counted as stale results)
        assert ctx.counters["stale_results"] - before == 40
        assert ctx.bus.unread_bytes(agent_id, ctx.route(agent_id)) == 0  # and settled: nothing left to re-read
