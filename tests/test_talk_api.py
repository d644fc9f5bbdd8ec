"""Agents that talk (issue #14): the Python API's semantics, on real agents and a real bus.

Each test drives one flow of ``talk_handlers.Flow`` (a class agent) from one task; the
other agents answer in ``on_message``.  The origin flows (round trip, five status
updates in order, a relay A->B->C, three concurrent senders x 10 to one receiver) run
on shm with and without batch/shard/pool; tests/test_talk_redis.py runs them on Redis.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cfn_core import Coordinator

HERE = str(Path(__file__).resolve().parent)

ORIGIN_PLUGIN_SETS = [(), ("batch",), ("shard",), ("pool",), ("batch", "shard", "pool")]


@pytest.fixture
def talk_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CFN_TALK_DIR", str(tmp_path))
    return tmp_path


def flow_config(make_config, plugins=(), agents=3, handler="talk_handlers:Flow", **tables):
    workload = {"agents": agents, "handler": handler, "directory": HERE, "timeout": 60, **tables.pop("workload", {})}
    extra = {"pool": {"size": agents}} if "pool" in plugins else {}
    return make_config(plugins=plugins, workload=workload, **extra, **tables)


def run_one(config, *payloads):
    coord = Coordinator(config)
    result = coord.run(list(payloads))
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    return [result.results[f"r1-t{i:06d}"].value for i in range(len(payloads))], result


def origin_flows(config):
    """The bash bus's acceptance flows, each checked exactly."""
    with Coordinator(config) as coord:
        result = coord.run([{"op": "roundtrip"}])
        assert result.ok, result.results
        (value,) = [r.value for r in result.results.values()]
        assert value["echo"] == {"q": "ping"} and value["by"] != next(iter(result.results.values())).agent

        result = coord.run([{"op": "five_status"}])
        assert result.ok, result.results
        assert [r.value for r in result.results.values()] == [[1, 2, 3, 4, 5]]
        driver = next(iter(result.results.values())).agent
        handle = coord.ctx.agents[driver]
        assert handle.info["status"] == {"text": "step 5", "fields": {"step": 5}}
        assert handle.info["statuses"] >= 5

        result = coord.run([{"op": "relay"}])
        assert result.ok, result.results
        chain = next(iter(result.results.values())).value
        assert len(chain) == 3 and len(set(chain)) == 3 and chain[0] == next(iter(result.results.values())).agent

        result = coord.run([{"op": "senders", "n": n, "count": 10} for n in range(3)])
        assert result.ok, result.results
        assert [r.value for r in result.results.values()] == [list(range(10))] * 3


@pytest.mark.parametrize("plugins", ORIGIN_PLUGIN_SETS, ids=lambda p: "+".join(p) or "baseline")
def test_origin_flows(make_config, no_leaks, plugins):
    origin_flows(flow_config(make_config, plugins, agents=4))


def test_handler_taking_the_agent_is_detected_from_its_signature(make_config, no_leaks):
    values, _ = run_one(flow_config(make_config, agents=2, handler="talk_handlers:with_agent"), "a", "b")
    assert values[0] == {"id": "agent-0001", "role": "worker", "peers": ["agent-0002"], "payload": "a"}
    assert values[1]["id"] == "agent-0002" and values[1]["peers"] == ["agent-0001"]


def test_class_agent_keeps_state_across_tasks_and_on_stop_runs(make_config, no_leaks, talk_dir):
    values, _ = run_one(flow_config(make_config, agents=1), None, None, None)
    assert values == [{"tasks": n, "started_as": "agent-0001"} for n in (1, 2, 3)]
    assert (talk_dir / "on_stop-agent-0001").exists()


def test_many_senders_per_sender_fifo_and_nothing_lost(make_config, no_leaks):
    values, result = run_one(flow_config(make_config, agents=6), *[{"op": "senders", "n": n, "count": 200} for n in range(5)])
    assert values == [list(range(200))] * 5
    assert result.rounds[0].dead_lettered == 0


def test_send_to_unknown_agent_or_role_names_the_known_ones(make_config, no_leaks):
    values, _ = run_one(flow_config(make_config, agents=3), {"op": "unknown"}, {"op": "unknown_role"})
    for text in values:
        assert "agent-0001, agent-0002, agent-0003" in text and "roles: worker" in text
    assert "'agent-9999'" in values[0] and "'reviewer'" in values[1]


def test_oversized_body_names_the_limit(make_config, no_leaks):
    config = flow_config(make_config, agents=2, bus={"max_message_bytes": 4096})
    (text,), _ = run_one(config, {"op": "too_large", "size": 10000})
    assert "bus.max_message_bytes allows 4096" in text


def test_body_that_is_not_json_names_the_type(make_config, no_leaks):
    (text,), _ = run_one(flow_config(make_config, agents=2), {"op": "not_json"})
    assert text.startswith("NotJSON:") and "type set" in text


def test_request_timeout(make_config, no_leaks):
    (value,), _ = run_one(flow_config(make_config, agents=2), {"op": "request_timeout", "pause": 4, "timeout": 1.5})
    assert "no reply from agent-0002" in value["error"] and "1.5s" in value["error"]
    assert 1.5 <= value["waited"] < 4


def test_request_to_a_peer_that_dies_raises_peer_gone(make_config, no_leaks):
    (text,), _ = run_one(flow_config(make_config, agents=2), {"op": "peer_gone"})
    assert text.startswith("PeerGone: ") and "agent-0002 left the run" in text


def test_exception_in_on_message_fails_nothing_else_and_is_reported(make_config, no_leaks):
    (value,), result = run_one(flow_config(make_config, agents=2), {"op": "boom"})
    assert value == {"echo": {"q": "still alive?"}, "by": "agent-0002"}
    assert result.rounds[0].dead_lettered == 1  # the message whose handler failed, with the reason


def test_messages_of_another_kind_wait_while_a_handler_receives(make_config, no_leaks):
    (order,), _ = run_one(flow_config(make_config, agents=2), {"op": "queued_kinds"})
    assert order == ["x1", "y", "x2"]


def test_task_arriving_while_a_handler_receives_is_queued(make_config, no_leaks):
    values, _ = run_one(flow_config(make_config, agents=1, handler="talk_handlers:receive_briefly"), "wait", "next")
    assert values[0].startswith("timed out: agent agent-0001: no message within 1s") and values[1] == "next"


def test_full_inbox_blocks_then_raises_inbox_full(make_config, no_leaks):
    config = flow_config(make_config, agents=3, bus={"inbox_depth": 4}, workload={"timeout": 3})
    (report,), _ = run_one(config, {"op": "inbox_full", "pause": 8})
    # the paused agent holds its "pause" message and three items, unsettled: the fourth waited, then failed
    assert report["sent"] == 3
    assert "inbox_depth = 4" in report["error"] and report["waited"] >= 3


def test_stop_during_on_message_is_honoured_after_it(make_config, no_leaks, talk_dir):
    with Coordinator(flow_config(make_config, agents=2)) as coord:
        result = coord.run([{"op": "slow_then_stop", "seconds": 2}])
        assert result.ok
    other = "agent-0002" if next(iter(result.results.values())).agent == "agent-0001" else "agent-0001"
    assert (talk_dir / f"slow_done-{other}").exists() and (talk_dir / f"on_stop-{other}").exists()


def test_publish_reaches_subscribers_only(make_config, no_leaks):
    config = flow_config(make_config, ("pool",), agents=3)
    with Coordinator(config) as coord:
        coord.run([{"op": "subscribe", "topic": "news"}, {"op": "subscribe", "topic": "sports"}])
        result = coord.run([{"op": "publish"}])
        assert result.ok
    # who subscribed to what depends on the pool's assignment: exactly the "news" subscriber got it
    (value,) = [r.value for r in result.results.values()]
    assert sorted(value) in ([[], ["hello"]], [["hello"], ["hello"]]) or value == [["hello"], []]


def test_sends_to_a_role_are_spread_over_its_agents_and_the_same_on_a_retry(make_config, no_leaks, talk_dir):
    """Round robin per sender from a start that depends on the sender and the task: eight
    senders' first picks do not all land on one agent (they did: every sender began with the
    role's first agent), and a retried task picks the same agents in the same order, so its
    re-sends reach the receivers that drop them as copies."""
    agents = 8
    tasks = [{"op": "role_picks", "key": f"k{i}"} for i in range(agents)]
    with Coordinator(flow_config(make_config, agents=agents)) as coord:
        result = coord.run(tasks)
    assert result.ok
    picks = [r.value for r in result.results.values()]
    assert all(len(p) == 4 and r.agent not in p for p, r in zip(picks, result.results.values()))
    assert len({p[0] for p in picks}) >= 3, picks  # spread, not all on one
    assert all(len(set(p)) == len(p) for p in picks)  # round robin within a task

    with Coordinator(flow_config(make_config, agents=3, workload={"max_attempts": 3})) as coord:
        result = coord.run([{"op": "role_picks", "key": "retry", "die_once": True}])
    (only,) = result.results.values()
    assert only.ok and only.attempts == 2, only.error
    marks = sorted(p.name for p in talk_dir.iterdir() if p.name.startswith("picks-retry-"))
    assert len(marks) == 1 and len((talk_dir / marks[0]).read_text().split()) == 2, marks  # both attempts: same picks
