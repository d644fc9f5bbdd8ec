"""Results and peer messages stay right at the edges (issue 13, items 1, 2, 3, 5, 6, 10):
several runs of one pooled session, a task id given up on and submitted again, explicit
peers that could not arrive, and result records written by a stray or buggy process.

Hostile records are written straight into the coordinator's inbox with the bus's own
``deliver`` (what another local process could do), by test plugins handed to
``Coordinator(extra_plugins=[...])``: they run in the coordinator only.
"""

from __future__ import annotations

import os
import re
import sys

import orjson
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import fault_env, plugin_params, plugin_sets, read_log, set_id  # noqa: E402,F401

from cfn_core import COORDINATOR_ID, Coordinator, Task, hookimpl  # noqa: E402
from cfn_core.errors import ConfigError  # noqa: E402
from cfn_core.messages import Message, decode  # noqa: E402

MESH = {"topology": "mesh", "handler": "cfn_core.handlers:peer_sum"}


def pooled_sets():
    """The pool alone and every installed optimization together (agents outlive runs in both)."""
    sets = [p for p in plugin_sets(single=True) if "pool" in p]
    return [pytest.param(p, id=set_id(p)) for p in sets] or [pytest.param((), marks=pytest.mark.skip("no cfn-pool"))]


def _tables(plugins, agents, **workload):
    tables = {"workload": {"agents": agents, **workload}}
    if "pool" in plugins:
        tables["pool"] = {"size": agents}
    return tables


class Forger:
    """Coordinator-side test plugin: just before the coordinator sends a batch of tasks,
    writes ``records(ctx, task_messages)`` into the coordinator's own inbox, so they are
    read before any real result of those tasks can be."""

    def __init__(self, records, *, on_run=1):
        self.records = records
        self.on_run = on_run  # the session round whose first task batch triggers it
        self.rounds: list[int] = []  # what cfn_coordination_start received
        self.written = 0

    @hookimpl
    def cfn_coordination_start(self, ctx, round):
        self.rounds.append(round)

    @hookimpl(wrapper=True)
    def cfn_send(self, ctx, messages):
        tasks = [m for m in messages if m.kind == "task"]
        if tasks and len(self.rounds) == self.on_run and not self.written:
            records = self.records(ctx, tasks)
            ctx.bus.deliver(COORDINATOR_ID, ctx.route(COORDINATOR_ID), records)
            self.written = len(records)
        return (yield)


def _result(msg_id, src, task, round, body):
    return Message(id=msg_id, src=src, dst=COORDINATOR_ID, kind="result", round=round, task=task, body=body).encode()


# ---------------------------------------------------------------------- item 1: runs of one session


@pytest.mark.parametrize("plugins", pooled_sets())
def test_each_run_of_a_pooled_mesh_session_counts_only_its_own_peer_messages(make_config, no_leaks, plugins):
    agents, per_agent = 6, 3
    config = make_config(plugins=plugins, **_tables(plugins, agents, messages_per_agent=per_agent, **MESH))
    sizes = [6, 4, 5, 6]  # the task ids (r1-t000000...) repeat from run to run; the plans differ
    with Coordinator(config) as coord:
        results = [coord.run([f"p{i}" for i in range(size)]) for size in sizes]
        hit_rate = results[-1].plugin_figures.get("pool", {}).get("hit_rate")
    assert hit_rate and hit_rate > 0.5  # the same agents served the later runs
    for n, (size, result) in enumerate(zip(sizes, results), 1):
        r = result.rounds[0]
        assert result.ok, r.to_dict()
        # every task scattered 1..3; the gathered sums add up to what this run sent, no more
        assert sum(x.value for x in r.results.values()) == size * sum(range(1, per_agent + 1)), n
        assert sum(x.peers_received for x in r.results.values()) == size * per_agent
        assert r.planned == r.delivered == 2 * size + size * per_agent
    # users see round 1 of every run; the number on the wire goes on
    assert [(x.rounds[0].round, x.rounds[0].session_round) for x in results] == [(1, 1), (1, 2), (1, 3), (1, 4)]


@pytest.mark.parametrize("plugins", plugin_params())
def test_a_late_result_of_an_earlier_run_is_not_taken_for_the_next_one(make_config, no_leaks, plugins):
    """Task ids repeat from run to run (``r1-t000000``); the round number on the wire does not."""

    def stale(ctx, tasks):  # the earlier run's answer to the task id, from the agent it is sent to now
        first = tasks[0]
        return [_result(f"{first.dst}.1.999999", first.dst, first.task, forger.rounds[0], {"ok": True, "value": "stale"})]

    forger = Forger(stale, on_run=2)
    with Coordinator(make_config(plugins=plugins, **_tables(plugins, 2)), extra_plugins=[forger]) as coord:
        first = coord.run(["a", "b"])
        second = coord.run(["c", "d"])
    assert forger.written == 1
    assert first.ok and second.ok
    assert {k: v.value for k, v in second.results.items()} == {"r1-t000000": "c", "r1-t000001": "d"}
    assert second.rounds[0].duplicates == 0
    assert forger.rounds == [1, 2]  # cfn_coordination_start gets the session-wide number


# ---------------------------------------------------------------------- item 2: the give-up list


def test_a_task_given_up_on_runs_again_when_a_later_run_submits_its_id(make_config, fault_env, no_leaks):
    """The baseline queues both tasks on the one agent: it dies twice on the poison, the task is
    given up on and the third incarnation settles it unrun.  A later run's task of that id is new work."""
    tables = _tables((), 1, handler="test_faults_handlers:poison", max_attempts=2, timeout=20)
    payload = {"key": "t-poison", "dir": str(fault_env)}
    with Coordinator(make_config(**tables)) as coord:
        first = coord.run([Task(id="t-poison", payload={**payload, "poison": True}), Task(id="t-ok", payload={**payload, "key": "t-ok"})])
        second = coord.run([Task(id="t-poison", payload=payload)])
    assert first.results["t-poison"].ok is False and "gave up after 2 attempts" in first.results["t-poison"].error
    assert first.results["t-ok"].ok
    r = second.results["t-poison"]
    assert r.ok and r.answered and r.value == "t-poison" and r.attempts == 1, r
    assert [w for w, k, _ in read_log(fault_env) if k == "t-poison"] == ["start"] * 3  # twice poisoned, once run


class QueueOnOneAgent:
    """Queue every task on the first agent at once, as the baseline's round robin does
    with one agent (the pool would hand out one task per idle agent)."""

    @hookimpl(tryfirst=True)
    def cfn_assign(self, ctx, task, agent_ids):
        return agent_ids[0]


@pytest.mark.parametrize("plugins", pooled_sets())
def test_a_pooled_agent_that_read_the_give_up_list_runs_the_id_in_a_later_run(make_config, fault_env, no_leaks, plugins):
    """The third incarnation read the give-up list to settle the poison; the pool keeps it
    for the next run, which submits the id again."""
    tables = _tables(plugins, 1, handler="test_faults_handlers:poison", max_attempts=2, timeout=20)
    payload = {"key": "t-poison", "dir": str(fault_env)}
    with Coordinator(make_config(plugins=plugins, **tables), extra_plugins=[QueueOnOneAgent()]) as coord:
        first = coord.run([Task(id="t-poison", payload={**payload, "poison": True}), Task(id="t-ok", payload={**payload, "key": "t-ok"})])
        survivor = coord.ctx.agents[first.results["t-ok"].agent].pid
        second = coord.run([Task(id="t-poison", payload=payload)])
        assert coord.ctx.agents[second.results["t-poison"].agent].pid == survivor  # the same process
    assert first.results["t-poison"].ok is False and first.results["t-ok"].ok
    r = second.results["t-poison"]
    assert r.ok and r.value == "t-poison" and r.attempts == 1, r


@pytest.mark.parametrize("plugins", pooled_sets())
def test_a_pooled_round_goes_on_when_its_only_agent_dies_on_a_task_given_up_on(make_config, fault_env, no_leaks, plugins):
    """The pool hands out one task per idle agent: the one agent dies twice on the poison with
    nothing else outstanding, and the round still has a task to hand out (it used to wait for ever)."""
    tables = _tables(plugins, 1, handler="test_faults_handlers:poison", max_attempts=2, timeout=20)
    payload = {"key": "t-poison", "dir": str(fault_env)}
    with Coordinator(make_config(plugins=plugins, **tables)) as coord:
        result = coord.run([Task(id="t-poison", payload={**payload, "poison": True}), Task(id="t-ok", payload={**payload, "key": "t-ok"})])
    assert result.results["t-poison"].ok is False and "gave up after 2 attempts" in result.results["t-poison"].error
    assert result.results["t-ok"].ok and result.results["t-ok"].value == "t-ok"


# ---------------------------------------------------------------------- item 3: explicit peers


def test_explicit_peers_exchange_and_are_counted(make_config, no_leaks):
    """Round robin puts task i on agent i: the first sends one message to each other agent."""
    tasks = [
        Task(id="hub", payload=0, peers=("agent-0002", "agent-0003")),
        Task(id="left", payload=0, expect=1),
        Task(id="right", payload=0, expect=1),
    ]
    config = make_config(workload={"agents": 3, "handler": "cfn_core.handlers:peer_sum"})
    with Coordinator(config) as coord:
        result = coord.run(tasks)
    r = result.rounds[0]
    assert result.ok
    assert {k: v.value for k, v in r.results.items()} == {"hub": 0, "left": 1, "right": 2}
    assert r.planned == r.delivered == 2 * 3 + 2
    assert r.messages_sent == 3 + 3 + 2


@pytest.mark.parametrize(
    "tasks, why",
    [
        ([Task(id="a", peers=("agent-0002", "ghost-1")), Task(id="b", expect=1), Task(id="c")],
         r"task 'a': peer 'ghost-1' is not an agent of this round; its 3 agent\(s\): agent-0001, agent-0002, agent-0003"),
        ([Task(id="a", peers=("agent-0002",)), Task(id="b", expect=2)],
         r"task 'b': expect = 2 peer messages, but no agent is sent more than 1 in this round"),
        ([Task(id="a", expect=1000)],
         r"task 'a': expect = 1000 peer messages, but \[bus\] inbox_depth = 1000 lets an agent hold 999"),
        ([Task(id="a", peers=("agent-0002",) * 1000), Task(id="b", expect=999)],
         r"agent 'agent-0002' is sent 1000 peer messages in this round, but \[bus\] inbox_depth = 1000"),
        ([Task(id="a", peers=("agent-0002", "agent-0002")), Task(id="b", expect=1)],
         r"the tasks send 2 peer message\(s\) but expect 1 in all"),
        ([Task(id="a", peers=("../x",))], r"task 'a': peer agent id '../x' is not allowed"),
        ([Task(id="a", peers="agent-0002")], r"task 'a': peers = 'agent-0002' must be a list of agent ids"),
        ([Task(id="a", expect=-1)], r"task 'a': expect = -1 must be an integer >= 0"),
        ([Task(id="a", expect=True)], r"task 'a': expect = True must be an integer >= 0"),
    ],
    ids=["unknown-peer", "expect-unreachable", "expect-over-depth", "peers-over-depth", "unexpected-peer",
         "bad-peer-id", "peers-not-a-list", "negative-expect", "bool-expect"],
)
def test_explicit_peers_that_cannot_work_are_refused_before_anything_is_sent(make_config, fault_env, no_leaks, tasks, why):
    tasks = [Task(id=t.id, payload={"key": t.id, "dir": str(fault_env)}, peers=t.peers, expect=t.expect) for t in tasks]
    config = make_config(workload={"agents": 3, "handler": "test_faults_handlers:raise_on", "timeout": 300})
    with Coordinator(config) as coord:
        with pytest.raises(ConfigError, match=why):
            coord.run(tasks)
        assert read_log(fault_env) == []  # no task was sent
        again = coord.run([{"key": "after", "dir": str(fault_env)}])  # the session is still usable
    assert again.ok


def test_a_refused_mesh_leaves_no_task_outstanding_on_the_agents(make_config, no_leaks):
    """Outstanding work makes the pool see an agent busy and the watchdog time it out."""
    plugins = ("pool",) if ("pool",) in plugin_sets(single=True) else ()
    # the configured workload (one task) passes Coordinator's up-front check; the three payloads
    # given to run() are refused by the round's own plan, after agents were assigned
    config = make_config(plugins=plugins, bus={"inbox_depth": 3},
                         **_tables(plugins, 3, tasks=1, messages_per_agent=4, **MESH))
    with Coordinator(config) as coord:
        with pytest.raises(ConfigError, match="inbox_depth = 3"):
            coord.run(["a", "b", "c"])
        assert {a: h.outstanding for a, h in coord.ctx.agents.items() if h.outstanding} == {}


# ---------------------------------------------------------------------- item 5: forged results


@pytest.mark.parametrize("plugins", plugin_params())
def test_a_result_from_another_agent_than_the_tasks_is_dead_lettered(make_config, no_leaks, plugins):
    def forged(ctx, tasks):
        others = sorted(ctx.agents)
        out = []
        for m in tasks:
            other = next(a for a in others if a != m.dst)
            out.append(_result(f"{other}.1.{len(out) + 1}", other, m.task, m.round, {"ok": True, "value": "forged"}))
            out.append(_result(f"intruder.1.{len(out) + 1}", "intruder", m.task, m.round, {"ok": True, "value": "forged"}))
        return out

    forger = Forger(forged)
    with Coordinator(make_config(plugins=plugins, **_tables(plugins, 3)), extra_plugins=[forger]) as coord:
        result = coord.run(["a", "b", "c"])
        dead = [d for d in coord.ctx.bus.dead_letters() if d["agent"] == COORDINATOR_ID]
    assert forger.written == 6
    assert result.ok
    r = result.rounds[0]
    assert sorted(x.value for x in r.results.values()) == ["a", "b", "c"]
    assert r.duplicates == 0 and r.dead_lettered == 6
    assert len(dead) == 6
    assert all("but the task was sent to '" in d["reason"] for d in dead), dead
    assert sum("from 'intruder'" in d["reason"] for d in dead) == 3


# ---------------------------------------------------------------------- item 6: peer seq


def _records(run_dir, location):
    with open(os.path.join(run_dir, location), "rb") as f:
        data = f.read()
    # a write is one record, or a batch of records joined by \x1e, ended by \n
    return [decode(rec) for rec in re.split(b"[\n\x1e]", data) if rec[:1] == b"{"]


@pytest.mark.parametrize("plugins", [pytest.param(p, id=set_id(p)) for p in plugin_sets(single=True) if "shard" not in p and "batch" not in p])
def test_peer_messages_carry_their_senders_sequence_numbers_and_ids_unique_in_the_session(make_config, no_leaks, plugins):
    """Read back every record of the session from the inbox files (a reader never truncates them)."""
    agents = 4
    config = make_config(plugins=plugins, **_tables(plugins, agents, messages_per_agent=2, **MESH))
    runs = []
    with Coordinator(config) as coord:
        for _ in range(2):
            assert coord.run().ok
            ctx = coord.ctx
            everything = [m for a in [COORDINATOR_ID, *ctx.agents] for m in _records(ctx.bus.run_dir, ctx.route(a))]
            runs.append([m for m in everything if m.id not in {x.id for run in runs for x in run}])
    peers = [m for run in runs for m in run if m.kind == "peer"]
    assert len(peers) == 2 * agents * 2
    assert len({m.id for m in peers}) == len(peers)  # unique across both runs
    # one incarnation per agent per run (the baseline starts new ones for every run, the pool
    # keeps them): its seqs, over every kind of message it sent, never repeat
    scope = [sum(runs, [])] if "pool" in plugins else runs
    for records in scope:
        by_sender: dict[str, list[int]] = {}
        for m in records:
            if m.src != COORDINATOR_ID:
                by_sender.setdefault(m.src, []).append(m.seq)
        for src, seqs in by_sender.items():
            assert len(seqs) == len(set(seqs)) and min(seqs) >= 1, (src, sorted(seqs))


# ---------------------------------------------------------------------- item 10: malformed results


BAD_BODIES = {
    "peers_received -1000": {"ok": True, "value": "forged", "peers_received": -1000},
    "peers_sent -5": {"ok": True, "value": "forged", "peers_sent": -5},
    "ok missing": {"value": "forged"},
    "ok a string": {"ok": "yes", "value": "forged"},
    "seconds a string": {"ok": True, "value": "forged", "seconds": "slow"},
    "seconds negative": {"ok": True, "value": "forged", "seconds": -1.0},
    "error a number": {"ok": False, "error": 7},
    "fallbacks not a list": {"ok": True, "value": "forged", "fallbacks": "x"},
    "counters not an object": {"ok": True, "value": "forged", "counters": [1]},
    "body a list": ["forged"],
}


@pytest.mark.parametrize("plugins", plugin_params())
def test_malformed_results_are_dead_lettered_and_the_real_ones_accepted(make_config, no_leaks, plugins):
    """Every record names the task's own agent, so only its shape can give it away."""

    def malformed(ctx, tasks):
        out = []
        for m in tasks:
            # the id without '.' plus fallbacks: an IndexError in the coordinator before
            fallbacks = [{"hook": "cfn_send", "plugin": "x", "count": 5}]
            out.append(_result("noperiod", m.dst, m.task, m.round, {"ok": True, "value": "forged", "fallbacks": fallbacks}))
            out.append(_result(f"someone-else.1.{len(out)}", m.dst, m.task, m.round, {"ok": True, "value": "forged"}))
            out.append(Message(id=f"{m.dst}.1.{len(out)}", src=m.dst, dst=COORDINATOR_ID, kind="result", round=m.round,
                               task=None, body={"ok": True}).encode())
            for body in BAD_BODIES.values():
                out.append(_result(f"{m.dst}.1.{len(out)}", m.dst, m.task, m.round, body))
        return out

    forger = Forger(malformed)
    with Coordinator(make_config(plugins=plugins, **_tables(plugins, 2)), extra_plugins=[forger]) as coord:
        result = coord.run(["a", "b"])
        dead = [d for d in coord.ctx.bus.dead_letters() if d["agent"] == COORDINATOR_ID]
    per_task = 3 + len(BAD_BODIES)
    assert forger.written == 2 * per_task
    assert result.ok and sorted(x.value for x in result.results.values()) == ["a", "b"]
    assert result.rounds[0].dead_lettered == len(dead) == 2 * per_task
    assert not result.fallbacks  # nothing of a rejected record is counted
    reasons = [d["reason"] for d in dead]
    assert sum("result id 'noperiod' is not '" in x for x in reasons) == 2
    assert sum("'peers_received' = -1000 is not an integer >= 0" in x for x in reasons) == 2
    assert sum("field 'ok' is missing or not true/false" in x for x in reasons) == 4
    assert sum("result body is list, not an object" in x for x in reasons) == 2
    assert sum(x == "result names no task" for x in reasons) == 2
    raw = [orjson.loads(__import__("base64").b64decode(d["raw_b64"])) for d in dead]
    assert all(rec["kind"] == "result" for rec in raw)
