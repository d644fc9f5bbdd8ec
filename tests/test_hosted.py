"""Hosted agents (issue #19, docs/HOSTING.md): asyncio agents inside real host processes.

Every test runs real host processes on a real /dev/shm bus; fault tests SIGKILL a real
host.  What each proves is in its name and its asserts.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from pathlib import Path

import psutil
import pytest

from cfn_core import Coordinator, ConfigError
from cfn_core.testing import wait_for

HERE = str(Path(__file__).resolve().parent)


def hosted(make_config, agents=6, handler="hosted_handlers:echo", hosts=2, **workload):
    return make_config(
        workload={"agents": agents, "handler": handler, "directory": HERE, "host": "async", "hosts": hosts, "timeout": 60, **workload}
    )


def host_pids(coord) -> set[int]:
    return {h.pid for h in coord.ctx.state["cfn.hosting"].hosts.values() if h.alive}


def test_async_agents_run_in_host_processes_with_their_own_ids(make_config, no_leaks):
    with Coordinator(hosted(make_config, agents=40)) as coord:
        from cfn_core.live import build_snapshot

        ready = coord.ctx.hook.cfn_acquire_agents(ctx=coord.ctx, count=40)
        assert len(ready) == 40
        snapshot = build_snapshot(coord.ctx, coord.ctx.live, 0.0)  # what cfn top shows
        assert {a["host"] for a in snapshot["agents"]} == {"_host.worker.1", "_host.worker.2"}
        assert len({a["pid"] for a in snapshot["agents"]}) == 2
        result = coord.run(list(range(40)))
        assert result.ok and result.delivery_rate == 1.0
        values = [r.value for r in result.results.values()]
        pids = {v["pid"] for v in values}
        assert pids == host_pids(coord) and len(pids) == 2  # two host processes, not 40 agents
        assert os.getpid() not in pids
        assert sorted(v["id"] for v in values) == sorted(f"agent-{i:04d}" for i in range(1, 41))
        assert {r.agent for r in result.results.values()} == {v["id"] for v in values}
        # the directory and cfn top's snapshot show each hosted agent with its host
        directory = json.loads(coord.ctx.bus.get_state("directory"))
        assert directory["agents"]["agent-0001"] == {"role": "worker", "host": "_host.worker.1"}
        assert directory["agents"]["agent-0002"]["host"] == "_host.worker.2"
        # no pidfd per hosted agent: the coordinator watches the hosts only
        assert all(h.pidfd is None and h.remote is not None for h in coord.ctx.agents.values())
        from cfn_core.hosting import hosted_report

        assert hosted_report(coord.ctx)["hosts"] == 2


def test_sync_handlers_run_in_the_hosts_thread_pool(make_config, no_leaks):
    with Coordinator(hosted(make_config, agents=8, handler="hosted_handlers:sync_echo")) as coord:
        result = coord.run(list(range(8)))
        assert result.ok, [r.error for r in result.results.values()]
        assert {r.value["pid"] for r in result.results.values()} == host_pids(coord)
        assert all(r.value["peers"] == 7 for r in result.results.values())  # agent.peers() from a thread


def mixed(make_config, plugins=(), **extra):
    return make_config(
        plugins=plugins,
        workload={"directory": HERE, "timeout": 60},
        agents={
            "h": {"count": 4, "handler": "hosted_handlers:Talker", "host": "async", "hosts": 2},
            "p": {"count": 2, "handler": "hosted_handlers:SyncTalker"},
        },
        **extra,
    )


@pytest.mark.parametrize("plugins", [(), ("batch", "shard")], ids=["baseline", "batch+shard"])
def test_hosted_and_process_agents_request_and_reply_both_ways(make_config, no_leaks, plugins):
    with Coordinator(mixed(make_config, plugins=plugins)) as coord:
        tasks = [
            {"role": "h", "payload": {"op": "ask", "to": "h-0003", "q": "same host"}},
            {"role": "h", "payload": {"op": "ask", "to": "h-0001", "q": "other host"}},
            {"role": "h", "payload": {"op": "ask", "to": "p-0001", "q": "to a process"}},
            {"role": "p", "payload": {"op": "ask", "to": "h-0004", "q": "from a process"}},
        ]
        from cfn_core import Task

        result = coord.run([Task(id=f"t{i}", payload=t["payload"], role=t["role"]) for i, t in enumerate(tasks)])
        assert result.ok, [r.error for r in result.results.values()]
        answers = {t: result.results[t].value["answer"] for t in ("t0", "t1", "t2", "t3")}
        assert answers["t0"]["echo"] == {"q": "same host"} and answers["t0"]["by"] == "h-0003"
        assert answers["t1"]["by"] == "h-0001"
        assert answers["t2"]["by"] == "p-0001" and answers["t2"]["pid"] not in host_pids(coord)
        assert answers["t3"]["by"] == "h-0004" and answers["t3"]["pid"] in host_pids(coord)
        hosts = {h.id: h.info.get("host") for h in coord.ctx.agents.values()}
        assert hosts["p-0001"] is None and hosts["h-0001"] == "_host.h.1"


@pytest.mark.parametrize("sender,receiver", [("h", "p"), ("p", "h"), ("h", "h")])
def test_per_sender_order_and_nothing_lost_between_hosted_and_process(make_config, no_leaks, sender, receiver):
    from cfn_core import Task

    # tasks go round robin over their role's agents: gather to <receiver>-0001, burst to the
    # next agent of its role (h-0002, in the other host, when both are hosted)
    src = f"{sender}-0002" if sender == receiver else f"{sender}-0001"
    dst = f"{receiver}-0001"
    n = 300
    with Coordinator(mixed(make_config)) as coord:
        result = coord.run([
            Task(id="gather", role=receiver, payload={"op": "gather", "n": n}),
            Task(id="burst", role=sender, payload={"op": "burst", "n": n, "to": dst}),
        ])
        assert result.ok, [r.error for r in result.results.values()]
        assert result.results["burst"].agent == src and result.results["gather"].agent == dst
        got = result.results["gather"].value
        assert got == [[src, i] for i in range(n)]


def test_a_handler_exception_fails_only_its_task(make_config, no_leaks):
    with Coordinator(hosted(make_config, agents=10, handler="hosted_handlers:fails_on_odd", hosts=1)) as coord:
        before = host_pids(coord) if "cfn.hosting" in coord.ctx.state else set()
        result = coord.run(list(range(10)))
        failed = {r.value if r.ok else int(r.error.split()[-1]) for r in result.results.values() if not r.ok}
        assert failed == {1, 3, 5, 7, 9}
        assert all("ValueError: odd payload" in r.error for r in result.results.values() if not r.ok)
        assert sorted(r.value for r in result.results.values() if r.ok) == [0, 2, 4, 6, 8]
        assert all(r.attempts == 1 for r in result.results.values())
        pids = host_pids(coord)
        assert len(pids) == 1 and (not before or before == pids)
        result = coord.run([0, 2])  # the same host and agents serve the next round
        assert result.ok and host_pids(coord) == pids
        assert coord.ctx.counters["hosts_started"] == 1


def test_event_loop_lag_is_measured_reported_and_counted(make_config, no_leaks, tmp_path):
    events = tmp_path / "events.jsonl"
    config = make_config(
        workload={"agents": 3, "handler": "hosted_handlers:Talker", "directory": HERE, "host": "async", "hosts": 1, "loop_lag": 0.2}
    )
    with Coordinator(config, events=str(events)) as coord:
        result = coord.run([{"op": "block", "seconds": 0.8}, "x", "y"])
        assert result.ok
        wait_for(lambda: coord.ctx.counters["host_lags"] >= 1 or coord.ctx.pump(0.05), "the host's lag report")
        from cfn_core.hosting import hosted_report

        hosting = hosted_report(coord.ctx)
        assert hosting["loop_lags"] >= 1 and hosting["worst_lag_seconds"] >= 0.5
    lags = [json.loads(line) for line in events.read_text().splitlines() if '"host_lag"' in line]
    assert lags and lags[0]["host"] == "_host.worker.1" and lags[0]["seconds"] >= 0.5


def test_a_task_timeout_restarts_that_agent_in_its_host_only(make_config, no_leaks, tmp_path):
    marker = tmp_path / "hung"
    config = hosted(make_config, agents=4, handler="hosted_handlers:Talker", hosts=1, timeout=2)
    with Coordinator(config) as coord:
        result = coord.run([{"op": "hang", "marker": str(marker)}, "b", "c", "d"])
        assert result.ok, [r.error for r in result.results.values()]
        hung = result.results["r1-t000000"]
        assert hung.value == "second attempt" and hung.attempts == 2
        assert all(r.attempts == 1 for t, r in result.results.items() if t != "r1-t000000")
        assert coord.ctx.counters["hosts_started"] == 1  # the host was not restarted
        assert coord.ctx.agents[hung.agent].incarnation == 2


def test_sigkill_of_a_host_mid_round_reruns_its_unfinished_tasks_exactly_once(make_config, no_leaks, tmp_path):
    log = tmp_path / "runs.log"
    agents = 10
    payloads = []
    for i in range(agents):  # task i goes to agent-000(i+1): odd agent numbers live in host 1
        p = {"op": "die_once", "log": str(log), "task": f"t{i}"}
        if i % 2 == 0:
            p["marker"] = str(tmp_path / f"m{i}")
        payloads.append(p)
    config = hosted(make_config, agents=agents, handler="hosted_handlers:Talker", hosts=2)
    killed = []

    def killer():
        wait_for(lambda: all((tmp_path / f"m{i}").exists() for i in range(0, agents, 2)), "host 1's tasks to start")
        pid = int((tmp_path / "m0").read_text())
        assert psutil.Process(pid).cmdline()[-3] == "_host.worker.1"
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    with Coordinator(config) as coord:
        thread = threading.Thread(target=killer)
        thread.start()
        result = coord.run(payloads)
        thread.join()
        assert result.ok and result.delivery_rate == 1.0, [r.error for r in result.results.values()]
        for i in range(agents):
            r = result.results[f"r1-t{i:06d}"]
            if i % 2 == 0:
                assert r.attempts == 2 and r.value["pid"] != killed[0], r
            else:
                assert r.attempts == 1, r
        assert killed[0] not in host_pids(coord) and len(host_pids(coord)) == 2
        assert coord.ctx.counters["hosts_started"] == 3
    runs = log.read_text().split()
    tasks = sorted(runs[0::2])
    assert tasks == sorted(f"t{i}" for i in range(agents))  # every task completed exactly once


def test_one_doorbell_per_host_and_no_descriptor_per_agent_in_the_coordinator(make_config, no_leaks):
    me = psutil.Process()
    agents = 300
    with Coordinator(hosted(make_config, agents=agents, hosts=2)) as coord:
        fds_before = me.num_fds()
        result = coord.run(list(range(agents)))
        assert result.ok
        bell = Path(coord.ctx.run_ref) / "bell"
        kinds = {"socket": [], "link": []}
        for entry in bell.iterdir():
            mode = os.lstat(entry).st_mode
            kinds["link" if stat.S_ISLNK(mode) else "socket" if stat.S_ISSOCK(mode) else "other"] = (
                kinds.get("link" if stat.S_ISLNK(mode) else "socket" if stat.S_ISSOCK(mode) else "other", []) + [entry.name]
            )
        assert sorted(kinds["socket"]) == sorted(["_coordinator", "_hosts", "_host.worker.1", "_host.worker.2"])
        assert len(kinds["link"]) == agents and "other" not in kinds
        assert os.readlink(bell / "agent-0001") == "_host.worker.1"
        for pid in host_pids(coord):  # each host binds one doorbell for all its agents
            sockets = [c for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr]
            assert len(sockets) == 1, sockets
        # no process handle per hosted agent: the coordinator's pidfds are its hosts' (the
        # other descriptors are the bus's bounded cache of inboxes it appended to)
        links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
        assert sum("pidfd" in link for link in links) == 2
        assert me.num_fds() - fds_before < agents + 20


def test_hosted_agents_are_stopped_by_one_order_per_host_after_reading_their_inboxes(make_config, no_leaks, tmp_path, monkeypatch):
    monkeypatch.setenv("CFN_HOSTED_DIR", str(tmp_path))
    agents, hosts = 40, 2
    with Coordinator(hosted(make_config, agents=agents, hosts=hosts, handler="hosted_handlers:CountsMessages")) as coord:
        tasks = [{"n": 25, "to": f"agent-{i % agents + 1:04d}"} for i in range(agents)]  # each to the next agent
        result = coord.run(tasks)
        assert result.ok and result.delivery_rate == 1.0
        ctx = coord.ctx
    # the coordinator sent a task per agent and per host an add order, a stop_agents order
    # (when the run released its agents) and a stop order (at close): no stop record per agent
    assert ctx.counters["sent"] == agents + 3 * hosts
    # and every agent read what its peer had sent it before it stopped
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.name.startswith("agent-")} == {
        f"agent-{i:04d}": "25" for i in range(1, agents + 1)
    }


def test_bad_host_setting_names_the_key_and_the_allowed_values(make_config):
    with pytest.raises(ConfigError) as info:
        make_config(workload={"host": "thread"})
    text = str(info.value)
    assert "host" in text and "'thread'" in text and "process" in text and "async" in text


ROOT = Path(HERE).parent


def documented_host_events() -> dict[str, set[str]]:
    import re

    text = (ROOT / "docs" / "HOSTING.md").read_text().partition("\n## Events\n")[2]
    row = re.compile(r"^\| `(\w+)` \|", re.M)
    return {s.partition("\n")[0].strip(): set(row.findall(s)) for s in re.split(r"^### ", text, flags=re.M)[1:]}


def test_docs_list_exactly_the_host_events_and_their_fields(make_config, no_leaks, tmp_path):
    events = tmp_path / "events.jsonl"
    config = make_config(
        workload={"agents": 2, "handler": "hosted_handlers:Talker", "directory": HERE, "host": "async", "hosts": 1, "loop_lag": 0.2}
    )
    with Coordinator(config, events=str(events)) as coord:
        assert coord.run([{"op": "block", "seconds": 0.8}, "x"]).ok
        wait_for(lambda: coord.ctx.counters["host_lags"] >= 1 or coord.ctx.pump(0.05), "the host's lag report")
    emitted: dict[str, set[str]] = {}
    started = {}
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if event["type"].startswith("host_"):
            emitted.setdefault(event["type"], set()).update(set(event) - {"v", "ts", "type"})
        elif event["type"] == "agent_started":
            started[event["agent"]] = event["host"]
    assert emitted == documented_host_events()
    assert started == {"agent-0001": "_host.worker.1", "agent-0002": "_host.worker.1"}  # each with its host


def test_the_hosting_page_snippets_run(make_config, no_leaks, tmp_path):
    import re
    import tomllib

    from cfn_core.config import config_from_dict

    text = (ROOT / "docs" / "HOSTING.md").read_text()
    [toml_block] = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    data = tomllib.loads(toml_block)
    config = config_from_dict(data)
    from cfn_core.roles import roles_of

    roles = roles_of(config)
    assert roles["researcher"].host == "async" and roles["reviewer"].host == "process"
    [python_block] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (tmp_path / "snippet_research.py").write_text(python_block)
    n = 20
    config = make_config(workload={"agents": n, "handler": "snippet_research:research", "directory": str(tmp_path),
                                   "host": "async", "hosts": 2})
    ids = [f"agent-{i:04d}" for i in range(1, n + 1)]
    with Coordinator(config) as coord:
        result = coord.run([{"topic": i, "next": ids[(i + 1) % n]} for i in range(n)])
    assert result.ok and sorted(r.value["theirs"] for r in result.results.values()) == list(range(n))
