"""Real coordinations: star and mesh with many agents, rounds, explicit tasks, dynamic
assignment, fallback to the baseline when a plugin step fails, and strict mode.

Test plugins are plain objects handed to ``Coordinator(extra_plugins=[...])``.
"""

from __future__ import annotations

import pytest

from cfn_core import Coordinator, Task, hookimpl
from cfn_core.errors import CfnError, ConfigError, PluginError


def test_star_50_agents_two_rounds(make_config, no_leaks):
    config = make_config(workload={"agents": 50, "rounds": 2, "payload_bytes": 32})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok and result.exit_code == 0
    assert len(result.rounds) == 2
    for r in result.rounds:
        assert r.agents == 50 and r.tasks == 50
        assert r.planned == r.delivered == 100
        assert r.messages_sent == 100
        assert r.dead_lettered == 0 and r.duplicates == 0 and r.retries == 0
        assert set(r.phases) == {"spawn", "ready", "distribute", "execute", "collect", "shutdown"}
        assert all(v >= 0 for v in r.phases.values())
        assert r.latency_p50 is not None and r.latency_p99 >= r.latency_p50
    assert result.tasks == 100 and result.delivered == result.planned == 200
    assert result.delivery_rate == 1.0
    # every task answered once, by an agent of the round, with the payload echoed
    results = result.results
    assert len(results) == 100
    assert {r.value for r in results.values()} == {"x" * 32}
    assert {r.agent for r in result.rounds[0].results.values()} == {f"agent-{i:04d}" for i in range(1, 51)}
    summary = result.to_dict()
    assert summary["messages_planned"] == summary["messages_delivered"] == 200
    assert summary["rounds"][1]["round"] == 2


def test_mesh_100_agents_counts_every_peer_message(make_config, no_leaks):
    config = make_config(
        workload={"agents": 100, "topology": "mesh", "messages_per_agent": 5, "handler": "cfn_core.handlers:peer_sum", "seed": 7}
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    r = result.rounds[0]
    assert r.planned == 2 * 100 + 100 * 5
    assert r.delivered == r.planned
    assert r.messages_sent == 100 + 100 + 500
    assert sum(x.peers_received for x in r.results.values()) == 500
    # the bodies travelled: every agent scattered 1..5, the gathered sums add up to what was sent
    assert sum(x.value for x in r.results.values()) == 100 * 15


def test_run_with_explicit_payloads_returns_per_task_results(make_config, no_leaks):
    payloads = [{"n": 1}, [1, 2, 3], "text", 42, None, {"nested": {"deep": [True, False]}}, 3.5]
    config = make_config(workload={"agents": 3})
    with Coordinator(config) as coord:
        result = coord.run(payloads)
    assert result.ok
    results = result.rounds[0].results
    assert [results[f"r1-t{i:06d}"].value for i in range(len(payloads))] == payloads
    assert all(r.ok and r.error is None and r.attempts == 1 for r in results.values())
    # more tasks than agents: round robin, every agent worked
    assert {r.agent for r in results.values()} == {"agent-0001", "agent-0002", "agent-0003"}


def test_run_with_task_objects_keeps_their_ids(make_config, no_leaks):
    config = make_config(workload={"agents": 2})
    tasks = [Task(id="alpha", payload="a"), Task(id="beta", payload="b")]
    with Coordinator(config) as coord:
        result = coord.run(tasks)
    assert {k: v.value for k, v in result.results.items()} == {"alpha": "a", "beta": "b"}


def test_run_rounds_argument_and_reuse_of_one_coordinator(make_config, no_leaks):
    config = make_config(workload={"agents": 2})
    with Coordinator(config) as coord:
        first = coord.run(["a"], rounds=3)
        second = coord.run(["b", "c"])
    assert [r.round for r in first.rounds] == [1, 2, 3]
    assert [r.value for r in first.results.values()] == ["a", "a", "a"]
    assert sorted(r.value for r in second.results.values()) == ["b", "c"]


def test_tasks_setting_decouples_tasks_from_agents(make_config, no_leaks):
    config = make_config(workload={"agents": 3, "tasks": 10})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok and result.tasks == 10 and result.agents == 3
    assert result.planned == result.delivered == 20


def test_duplicate_task_ids_are_refused(make_config):
    config = make_config(workload={"agents": 1})
    with Coordinator(config) as coord:
        with pytest.raises(ConfigError, match=r"task id 'same' appears more than once"):
            coord.run([Task(id="same", payload=1), Task(id="same", payload=2)])


# ---------------------------------------------------------------------- dynamic assignment


class OneAtATime:
    """Give a task only to an idle agent; say False ("ask again later") when none is."""

    name = "one-at-a-time"

    def __init__(self):
        self.refusals = 0
        self.max_outstanding = 0

    @hookimpl
    def cfn_assign(self, ctx, task, agent_ids):
        for agent_id in agent_ids:
            if not ctx.agents[agent_id].outstanding:
                return agent_id
        self.refusals += 1
        return False

    @hookimpl
    def cfn_tick(self, ctx, now):
        busy = max((len(h.outstanding) for h in ctx.agents.values()), default=0)
        self.max_outstanding = max(self.max_outstanding, busy)


def test_dynamic_assignment_waits_for_a_free_agent(make_config, no_leaks):
    plugin = OneAtATime()
    config = make_config(workload={"agents": 3})
    with Coordinator(config, extra_plugins=[plugin]) as coord:
        result = coord.run(list(range(12)))
    assert result.ok
    assert sorted(r.value for r in result.results.values()) == list(range(12))
    assert plugin.refusals > 0  # the distributor really had to wait
    assert plugin.max_outstanding <= 1
    assert len({r.agent for r in result.results.values()}) == 3


# ---------------------------------------------------------------------- fallback


class SpawnBreaks:
    """A spawn strategy that launches some agents, then crashes (its fork server died)."""

    name = "spawnbreaks"

    def __init__(self, launch_first=0):
        self.launch_first = launch_first
        self.calls = 0

    @hookimpl
    def cfn_spawn(self, ctx, agent_ids):
        self.calls += 1
        for agent_id in agent_ids[: self.launch_first]:
            ctx.launch(agent_id)
        raise RuntimeError("fork server died")


def test_failing_spawn_falls_back_to_the_baseline(make_config, no_leaks):
    plugin = SpawnBreaks()
    config = make_config(workload={"agents": 4, "rounds": 2})
    with Coordinator(config, extra_plugins=[plugin]) as coord:
        result = coord.run()
        text = coord.ctx.metrics.registry.get_sample_value(
            "cfn_fallbacks_total", {"hook": "cfn_spawn", "plugin": "spawnbreaks"}
        )
    assert result.ok and result.delivery_rate == 1.0
    assert plugin.calls == 2
    assert result.fallbacks == [
        {"hook": "cfn_spawn", "plugin": "spawnbreaks", "count": 2, "error": "RuntimeError: fork server died", "side": "coordinator"}
    ]
    assert text == 2.0
    from cfn_core.report import render_summary

    assert "fallback: spawnbreaks failed in cfn_spawn 2x (RuntimeError: fork server died); baseline used" in render_summary(result)
    assert result.to_dict()["fallbacks"][0]["plugin"] == "spawnbreaks"


def test_fallback_after_a_partial_spawn_reuses_the_agents_already_launched(make_config, no_leaks):
    plugin = SpawnBreaks(launch_first=2)
    config = make_config(workload={"agents": 4})
    with Coordinator(config, extra_plugins=[plugin]) as coord:
        result = coord.run()
        incarnations = {h.id: h.incarnation for h in coord.ctx.agents.values()}
    assert result.ok
    assert result.agents == 4
    assert incarnations == {f"agent-{i:04d}": 1 for i in range(1, 5)}  # none launched twice
    assert result.fallbacks[0]["hook"] == "cfn_spawn"


def test_strict_makes_a_plugin_failure_fatal(make_config, no_leaks):
    config = make_config(workload={"agents": 2}, run={"strict": True})
    with Coordinator(config, extra_plugins=[SpawnBreaks(launch_first=1)]) as coord:
        # one line naming the plugin and the hook (the CLI prints it without a traceback)
        with pytest.raises(PluginError, match=r"plugin 'spawnbreaks' failed in cfn_spawn \(RuntimeError: fork server died\)"):
            coord.run()
        assert coord.ctx.fallbacks == {}


class AssignBreaksSometimes:
    name = "assignbreaks"

    def __init__(self):
        self.n = 0

    @hookimpl
    def cfn_assign(self, ctx, task, agent_ids):
        self.n += 1
        if self.n % 2:
            raise KeyError("no idle agent table")
        return agent_ids[0]


def test_intermittent_plugin_failure_is_logged_once_and_counted_every_time(make_config, no_leaks, caplog):
    config = make_config(workload={"agents": 2, "tasks": 6})
    with caplog.at_level("WARNING", logger="cfn"):
        with Coordinator(config, extra_plugins=[AssignBreaksSometimes()]) as coord:
            result = coord.run()
    assert result.ok
    assert result.fallbacks == [
        {
            "hook": "cfn_assign",
            "plugin": "assignbreaks",
            "count": 3,
            "error": "KeyError: 'no idle agent table'",
            "side": "coordinator",
        }
    ]
    warnings = [r for r in caplog.records if "assignbreaks" in r.getMessage()]
    assert len(warnings) == 1


class ConfigRefused:
    name = "refuses"

    @hookimpl
    def cfn_spawn(self, ctx, agent_ids):
        raise CfnError("[refuses] mode = 'x': must be one of a, b")


def test_user_errors_from_a_plugin_are_never_swallowed(make_config, no_leaks):
    config = make_config(workload={"agents": 1})
    with Coordinator(config, extra_plugins=[ConfigRefused()]) as coord:
        with pytest.raises(CfnError, match="must be one of a, b"):
            coord.run()


# ---------------------------------------------------------------------- hooks see the lifecycle


class Recorder:
    name = "recorder"

    def __init__(self):
        self.events = []

    @hookimpl
    def cfn_session_start(self, ctx):
        self.events.append(("session_start",))

    @hookimpl
    def cfn_coordination_start(self, ctx, round):
        self.events.append(("start", round))

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        self.events.append(("started", agent.id))

    @hookimpl
    def cfn_agent_exited(self, ctx, agent, reason):
        self.events.append(("exited", agent.id, reason, agent.exit_code))

    @hookimpl
    def cfn_coordination_finish(self, ctx, result):
        self.events.append(("finish", result.round, result.delivered))

    @hookimpl
    def cfn_session_finish(self, ctx):
        self.events.append(("session_finish",))


def test_lifecycle_hooks_fire_in_order(make_config, no_leaks):
    rec = Recorder()
    config = make_config(workload={"agents": 2})
    with Coordinator(config, extra_plugins=[rec]) as coord:
        coord.run()
    e = rec.events
    assert e[0] == ("session_start",) and e[-1] == ("session_finish",)
    assert e[1] == ("start", 1)
    assert e[2:4] == [("started", "agent-0001"), ("started", "agent-0002")]  # baseline: one at a time
    assert sorted(e[4:6]) == [("exited", "agent-0001", "stopped", 0), ("exited", "agent-0002", "stopped", 0)]
    assert e[6] == ("finish", 1, 4)


def test_metrics_match_the_summary(make_config, no_leaks):
    config = make_config(workload={"agents": 4, "topology": "mesh", "messages_per_agent": 3})
    with Coordinator(config) as coord:
        result = coord.run()
        reg = coord.ctx.metrics.registry
        sent = reg.get_sample_value("cfn_messages_sent_total")
        delivered = reg.get_sample_value("cfn_messages_delivered_total")
        rate = reg.get_sample_value("cfn_delivery_rate")
        rounds = reg.get_sample_value("cfn_coordination_seconds_count")
        spawns = reg.get_sample_value("cfn_agent_spawn_seconds_count")
        exits = {
            reason: reg.get_sample_value("cfn_agent_exits_total", {"reason": reason})
            for reason in ("stopped", "died", "killed")
        }
        alive = reg.get_sample_value("cfn_agents")
    d = result.to_dict()
    assert sent == d["messages_sent"] == 4 + 4 + 12
    assert delivered == d["messages_delivered"] == 8 + 12
    assert rate == 1.0
    assert (rounds, spawns, alive) == (1, 4, 0)
    assert exits == {"stopped": 4, "died": None, "killed": None}


class AssignsAStranger:
    name = "stranger"

    @hookimpl
    def cfn_assign(self, ctx, task, agent_ids):
        return "agent-9999"


def test_assign_returning_an_unknown_agent_is_a_plugin_error(make_config, no_leaks):
    from cfn_core.errors import PluginError

    config = make_config(workload={"agents": 1})
    with Coordinator(config, extra_plugins=[AssignsAStranger()]) as coord:
        with pytest.raises(PluginError, match=r"cfn_assign returned 'agent-9999' for task r1-t000000, which is not an agent"):
            coord.run()


def test_the_run_directory_drops_an_agent_that_died(make_config, no_leaks):
    """The directory is rebuilt only when an agent is launched, becomes ready or exits
    (CoordinatorContext.write_directory): an exit alone, with nothing started in its place, must be
    enough for the dead agent to leave it."""
    import json
    import os
    import signal

    from cfn_core.testing import wait_for

    config = make_config(plugins=["pool"], pool={"size": 2, "min_size": 0}, workload={"agents": 2})
    with Coordinator(config) as coord:
        ctx = coord.ctx

        def listed() -> set[str]:
            ctx.pump(0.05)  # no round runs: this thread drives the event loop
            state = ctx.bus.get_state("directory")
            return set(json.loads(state)["agents"]) if state else set()

        wait_for(lambda: len(listed()) == 2, "both pooled agents in the directory")
        victim = sorted(listed())[0]
        os.kill(ctx.agents[victim].pid, signal.SIGKILL)
        wait_for(lambda: victim not in listed(), f"{victim} to leave the directory")
        assert not ctx.agents[victim].alive and len(listed()) == 1
