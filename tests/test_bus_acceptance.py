"""The original bash bus's acceptance behaviours, with real processes, on every transport.

* per-sender ordering, and concurrent senders each numbered without gaps;
* unique ids under same-millisecond bursts (also across processes and incarnations);
* a multi-hop relay A -> B -> C through three processes;
* shutdown drains in-flight messages: work queued before ``stop`` is done before the agent exits;
* whole coordinations (star and mesh) deliver everything.

Each bus test runs on the kernel's shm bus and on ``tests/dir_bus.py``, a
transport written only against :class:`cfn_core.bus.Bus`.  Both are opened the
way the kernel opens a bus, through their plugin's ``cfn_bus`` hook, and used
only through the protocol: a transport that passes here is one the kernel can run.
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

from cfn_core import Coordinator, config_from_dict  # noqa: E402
from cfn_core.messages import MessageFactory, decode  # noqa: E402
from cfn_core.testing import install_dist  # noqa: E402
from cfn_core.plugins import installed, load_plugin  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))

#: transport -> (module whose cfn_bus opens it, plugins that enable it)
TRANSPORTS = {"shm": ("cfn_core.builtin", ()), "dir": ("dir_bus", ("dirbus",))}

#: how a script opens the bus of the run it is given, like an agent does: through cfn_bus
_OPEN = """
import importlib, sys
from cfn_core import config_from_dict
def open_bus(module, run_ref):
    return importlib.import_module(module).cfn_bus(config=config_from_dict({}), run_ref=run_ref)
"""


@pytest.fixture
def dirbus_installed(tmp_path, monkeypatch):
    """``tests/dir_bus.py`` installed as the plugin ``dirbus``, here and in every child process.

    A real entry point in group ``cfn`` (a ``*.dist-info`` on the path, all ``pip install``
    leaves behind), so agents find it the way they find any plugin.
    """
    site = tmp_path / "site"
    install_dist(site, "cfn-dirbus", {"dirbus": "dir_bus"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), TESTS, os.environ.get("PYTHONPATH")])))
    installed.cache_clear()  # the entry points of this process were scanned already
    load_plugin.cache_clear()
    yield
    installed.cache_clear()
    load_plugin.cache_clear()


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request, bus_root, dirbus_installed):
    """``(module, open_bus)``: the transport's plugin module and a function opening a new run of it."""
    module = TRANSPORTS[request.param][0]
    mod = __import__(module, fromlist=["cfn_bus"])
    config = config_from_dict({"bus": {"root": str(bus_root)}})
    return module, lambda: mod.cfn_bus(config=config, run_ref=None)


def _inbox(agent_id: str) -> str:
    return f"inbox/{agent_id}"

_SENDER = _OPEN + textwrap.dedent(
    """
    import os
    from cfn_core.messages import MessageFactory
    module, run_ref, name, count, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    bus = open_bus(module, run_ref)
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


def test_concurrent_senders_keep_order_and_are_numbered_without_gaps(transport, no_leaks):
    module, open_bus = transport
    senders, per_sender = 4, 500
    bus = open_bus()
    bus.listen("sink")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SENDER, module, bus.run_ref, f"s{i}", str(per_sender), str(1 + 3 * i)],
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


_RELAY = _OPEN + textwrap.dedent(
    """
    import json
    from cfn_core.messages import MessageFactory, decode
    module, run_ref, me, nxt = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    bus = open_bus(module, run_ref)
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


def test_multi_hop_relay_a_to_b_to_c(transport, no_leaks):
    module, open_bus = transport
    count = 300
    bus = open_bus()
    # C and B bind their doorbells themselves; A (this process) starts sending at once
    c = subprocess.Popen([sys.executable, "-c", _RELAY, module, bus.run_ref, "C", "-"], stdout=subprocess.PIPE)
    b = subprocess.Popen([sys.executable, "-c", _RELAY, module, bus.run_ref, "B", "C"])
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


def coordination_params():
    """``(transport, plugins)``: every plugin set on shm; the dir bus alone and under cfn-batch.

    The dir bus is not combined with cfn-pool (whose zygote warms up on an shm bus of its
    own) here; cfn-shard on the dir bus is in test_a_coordination_delivers_everything.
    """
    out = [pytest.param("shm", p.values[0], id="shm-" + p.id, marks=p.marks) for p in plugin_params()]
    out += [pytest.param("dir", (), id="dir-baseline"), pytest.param("dir", ("batch",), id="dir-batch")]
    return out


@pytest.mark.parametrize(("transport_name", "plugins"), coordination_params())
def test_shutdown_drains_in_flight_messages(make_config, no_leaks, dirbus_installed, transport_name, plugins):
    """Tasks queued in the same batch as ``stop`` are all answered before the agent exits."""
    plugins = TRANSPORTS[transport_name][1] + tuple(plugins)
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


@pytest.mark.parametrize(
    ("transport_name", "plugins"),
    [("shm", ()), ("dir", ()), ("dir", ("batch",)), ("dir", ("shard",))],
    ids=["shm", "dir", "dir-batch", "dir-shard"],
)
@pytest.mark.parametrize("topology", ["star", "mesh"])
def test_a_coordination_delivers_everything(make_config, no_leaks, dirbus_installed, transport_name, plugins, topology):
    """A whole run, agents in processes of their own, on the transport: every message delivered.

    Under cfn-shard the dir bus's ``split_inboxes`` lets the plugin split the coordinator's
    inbox over shard locations, as on shm: the plugin asks the transport, not its name.
    """
    plugins = TRANSPORTS[transport_name][1] + tuple(plugins)
    tables = {"shard": {"count": 2}} if "shard" in plugins else {}
    config = make_config(plugins=plugins, workload={"agents": 4, "topology": topology, "messages_per_agent": 5, "rounds": 2}, **tables)
    with Coordinator(config) as coord:
        result = coord.run()
        assert coord.ctx.bus.name == transport_name
        assert coord.ctx.bus.dead_letter_count() == 0
        if "shard" in plugins:  # results reached the coordinator through both parts of its inbox
            parts = coord.ctx.state["shard.coordinator_in"]
            assert len(parts) == 2 and all(n > 0 for n in parts), parts
    assert result.ok, result
    assert result.delivery_rate == 1.0
    assert result.delivered == result.planned > 0


def _protocol_members() -> set[str]:
    from cfn_core.bus import Bus

    return {n for n in vars(Bus) if not n.startswith("_")} | set(Bus.__annotations__)


def test_both_transports_have_every_member_of_the_protocol(transport):
    _, open_bus = transport
    bus = open_bus()
    try:
        missing = sorted(n for n in _protocol_members() if not hasattr(bus, n))
    finally:
        bus.destroy()
    assert not missing, f"{type(bus).__name__} lacks {missing}"


def test_the_kernel_uses_nothing_of_a_bus_outside_the_protocol():
    """Every ``bus.X`` / ``ctx.bus.X`` / ``self.bus.X`` in cfn_core (outside cfn_core/bus/) is a member of Bus."""
    import ast
    from pathlib import Path

    root = Path(TESTS).parent / "cfn_core"
    used: dict[str, str] = {}
    for path in root.rglob("*.py"):
        if "bus" in path.relative_to(root).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            target = node.value
            named_bus = (isinstance(target, ast.Name) and target.id == "bus") or (
                isinstance(target, ast.Attribute)
                and target.attr == "bus"
                and isinstance(target.value, ast.Name | ast.Attribute)
                and getattr(target.value, "id", getattr(target.value, "attr", None)) != "config"  # [bus] settings
            )
            if named_bus:
                used.setdefault(node.attr, f"{path.relative_to(root)}:{node.lineno}")
    outside = {name: where for name, where in used.items() if name not in _protocol_members()}
    assert used and not outside, f"the kernel uses bus members the protocol does not define: {outside}"
