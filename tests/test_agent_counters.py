"""Agent-side plugin counters reach the coordinator (``ctx.agent_counters``), counted to the end.

The plugin here is really installed (a dist-info with an entry point on PYTHONPATH), so the
agents, separate processes, load it like any plugin; it counts every ``cfn_send`` call and
every message it sees sent in ``ctx.counters`` under ``probe.``.
"""

from __future__ import annotations

import os
import sys

import pytest

from cfn_core import Coordinator
from cfn_core.plugins import installed, load_plugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_plugins import make_dist  # noqa: E402

PROBE = '''
from cfn_core import hookimpl

REPORTS = []


@hookimpl(tryfirst=True)
def cfn_send(ctx, messages):
    if ctx.side == "agent":
        ctx.counters["probe.sends"] += 1
        ctx.counters["probe.results"] += sum(1 for m in messages if m.kind == "result")
    return None  # counted only: the next implementation sends


@hookimpl
def cfn_report(ctx):
    REPORTS.append(ctx.agent_counters("probe."))
    return None
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "cfn-probe", "0.1", "cfn_probe_plugin", PROBE, {"probe": "cfn_probe_plugin"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    installed.cache_clear()
    load_plugin.cache_clear()
    yield load_plugin("probe")
    installed.cache_clear()
    load_plugin.cache_clear()
    sys.modules.pop("cfn_probe_plugin", None)


def test_every_agents_counters_reach_the_coordinator_to_their_last_send(make_config, no_leaks, probe):
    """Baseline agents exit at the end of the round, before cfn_report: their final counters count.

    A result carries the counters as they were before it was sent, so from results alone
    the last send of every agent (its result) would be missing.
    """
    agents = 3
    with Coordinator(make_config(plugins=("probe",), workload={"agents": agents})) as coord:
        result = coord.run(["a", "b", "c"])
    assert result.ok
    (report,) = probe.REPORTS
    assert len(report) == agents  # one snapshot per agent process
    assert {agent for agent, _process in report} == {f"agent-{i:04d}" for i in range(1, agents + 1)}
    for counters in report.values():
        # ready, one result: two sends, the second the result itself (after that result's snapshot)
        assert counters == {"probe.sends": 2, "probe.results": 1}


def test_counters_of_other_names_and_forged_shapes_are_left_out(make_config, no_leaks, probe):
    """``agent_counters(prefix)`` gives a plugin its own counters, integers only."""
    with Coordinator(make_config(plugins=("probe",), workload={"agents": 1})) as coord:
        coord.run(["a"])
        coord.ctx.figures.take_result("intruder", "intruder.1", 99, {"probe.sends": "many", "probe.x": 1.5})
        everything = coord.ctx.agent_counters()
        mine = coord.ctx.agent_counters("probe.")
    assert ("intruder", "intruder.1") not in mine
    (counters,) = mine.values()
    assert set(counters) == {"probe.sends", "probe.results"}
    (agent_all,) = [c for key, c in everything.items() if key[0] == "agent-0001"]
    assert agent_all["received"] >= 2 and set(counters) <= set(agent_all)  # the kernel's own counters too


def test_hosted_agents_final_counters_travel_with_their_hosts_exit_report(make_config, no_leaks, probe):
    """A hosted agent leaves no state file per agent: its host reports its final counters.

    Its sends go through its host's ``ctx`` (one ``cfn_send`` for the records of all its
    agents in a turn), so what a plugin counts there is reported under the host's id.
    """
    agents = 6
    config = make_config(
        plugins=("probe",),
        workload={"agents": agents, "handler": "hosted_handlers:echo", "directory": os.path.dirname(os.path.abspath(__file__)),
                  "host": "async", "hosts": 2},
    )
    with Coordinator(config) as coord:
        result = coord.run(list(range(agents)))
        exit_states = [k for k in os.listdir(os.path.join(coord.ctx.run_ref, "state")) if k.startswith("figures.")]
        everything = coord.ctx.agent_counters()
    assert result.ok and exit_states == []
    (report,) = probe.REPORTS
    assert {agent for agent, _process in report} == {"_host.worker.1", "_host.worker.2"}
    assert sum(c["probe.results"] for c in report.values()) == agents  # to the last send: the results
    assert all(c["probe.sends"] >= 1 for c in report.values())
    per_agent = {agent: c for (agent, _process), c in everything.items() if not agent.startswith("_host.")}
    assert set(per_agent) == {f"agent-{i:04d}" for i in range(1, agents + 1)}
    for counters in per_agent.values():
        assert counters["sent"] == 2 and counters["received"] >= 1  # its ready and its result
