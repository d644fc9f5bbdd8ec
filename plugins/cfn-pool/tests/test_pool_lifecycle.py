"""cfn-pool with real processes: fill, reuse, growth, refill, health check, retirement, drain."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import psutil
import pytest

from cfn_core import Coordinator, Task

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pool_env(monkeypatch, tmp_path):
    """Make this directory's handlers importable by the coordinator, the zygote and the agents."""
    monkeypatch.syspath_prepend(HERE)
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


def pool_of(coord):
    return coord.ctx.state["pool"]


def pump_until(coord, predicate, timeout=20.0):
    """Run the coordinator's event loop until ``predicate()`` holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        coord.ctx.pump(0.05)


def live_agent_pids(coord):
    return {h.id: h.pid for h in coord.ctx.agents.values() if h.alive}


def test_pool_fills_at_open_and_rounds_reuse_the_same_processes(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 4, "rounds": 3}, pool={"size": 4})
    with Coordinator(config) as coord:
        pids_at_open = live_agent_pids(coord)
        assert len(pids_at_open) == 4
        assert set(pool_of(coord).idle) == set(pids_at_open)
        result = coord.run()
        assert live_agent_pids(coord) == pids_at_open  # nothing stopped, nothing started
    assert result.ok and result.delivery_rate == 1.0
    assert all(r.agents == 4 for r in result.rounds)
    assert {r.agent for r in result.results.values()} <= set(pids_at_open)
    figures = result.plugin_figures["pool"]
    assert figures["hits"] == 12 and figures["misses"] == 0 and figures["hit_rate"] == 1.0
    assert figures["zygote"] is True and figures["init_ready"] == 4


def test_agents_are_forked_from_the_zygote(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 3}, pool={"size": 3, "forkers": 2})
    with Coordinator(config) as coord:
        zygote = psutil.Process(pool_of(coord).zygote.pid)
        forkers = set(pool_of(coord).zygote.forker_pids)
        assert len(forkers) == 2 and zygote.pid in forkers
        for pid in live_agent_pids(coord).values():
            assert psutil.Process(pid).ppid() in forkers
        # the agents did not import anything themselves: they share the zygote's warm interpreter
        assert all(psutil.Process(pid).cmdline() == zygote.cmdline() for pid in live_agent_pids(coord).values())


def test_exhaustion_grows_the_pool_and_counts_misses(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 5, "rounds": 2}, pool={"size": 2})
    with Coordinator(config) as coord:
        result = coord.run()
        assert len(pool_of(coord).members) == 5
    assert result.ok
    figures = result.plugin_figures["pool"]
    assert (figures["hits"], figures["misses"]) == (2 + 5, 3)
    assert figures["hit_rate"] == pytest.approx(7 / 10)


def test_100_tasks_on_a_20_agent_pool(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 20, "tasks": 100, "payload_bytes": 8}, pool={"size": 20})
    with Coordinator(config) as coord:
        members = set(pool_of(coord).members)
        result = coord.run()
    assert result.ok and len(result.results) == 100
    assert result.delivery_rate == 1.0 and result.rounds[0].duplicates == 0
    used = {r.agent for r in result.results.values()}
    assert used <= members and len(used) > 1
    assert result.plugin_figures["pool"]["misses"] == 0
    assert result.plugin_figures["pool"]["assign_p99_ms"] is not None


def test_idle_agent_killed_is_refilled(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 3}, pool={"size": 3})
    with Coordinator(config) as coord:
        pool = pool_of(coord)
        victim = next(iter(pool.idle))
        os.kill(coord.ctx.agents[victim].pid, signal.SIGKILL)
        pump_until(coord, lambda: victim not in pool.members and len(pool.idle) == 3)
        assert pool.n["refills"] == 1 and pool.n["died_idle"] == 1
        result = coord.run()
    assert result.ok
    assert result.plugin_figures["pool"]["misses"] == 0


def test_busy_agent_killed_is_replaced_and_its_task_rerun(make_config, pool_env, no_leaks):
    tasks = [Task(id=f"t{i}", payload={"key": f"t{i}", "dir": str(pool_env), "hang": i == 1}) for i in range(3)]
    marker = pool_env / "t1.started"
    killed = []

    def kill_the_hung_agent(phase, done, total):
        if phase == "collect" and marker.exists() and not killed:
            killed.append(int(marker.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    config = make_config(
        plugins=["pool"], workload={"agents": 3, "handler": "pool_test_handlers:hang_once"}, pool={"size": 3}
    )
    with Coordinator(config, progress=kill_the_hung_agent) as coord:
        result = coord.run(tasks)
        pool = pool_of(coord)
        assert len(pool.members) == 3 and len(pool.idle) == 3  # the replacement went back to the pool
    assert killed
    assert result.ok and {r.value for r in result.results.values()} == {"t0", "t1", "t2"}
    assert result.results["t1"].attempts == 2
    assert result.plugin_figures["pool"]["relaunched"] == 1
    assert result.plugin_figures["pool"]["died_busy"] == 1


def test_unresponsive_idle_agent_is_replaced_before_it_gets_work(make_config, no_leaks):
    config = make_config(
        plugins=["pool"],
        workload={"agents": 3},
        pool={"size": 3, "health_interval": 0.0, "health_timeout": 3.0},  # healthy agents answer well within it under load
    )
    with Coordinator(config) as coord:
        pool = pool_of(coord)
        frozen = next(iter(pool.idle))
        os.kill(coord.ctx.agents[frozen].pid, signal.SIGSTOP)  # alive, but it will not answer
        result = coord.run()
        assert frozen not in pool.members
    assert result.ok and result.rounds[0].agents == 3
    assert frozen not in {r.agent for r in result.results.values()}
    assert result.plugin_figures["pool"]["unhealthy"] == 1


def test_idle_agents_older_than_max_idle_are_retired_down_to_min_size(make_config, no_leaks):
    config = make_config(
        plugins=["pool"], workload={"agents": 4}, pool={"size": 4, "min_size": 1, "max_idle": 0.2}
    )
    with Coordinator(config) as coord:
        pool = pool_of(coord)
        result = coord.run()
        pump_until(coord, lambda: len(pool.members) == 1 and not pool.retiring)
        assert pool.n["retired"] == 3
        assert len([h for h in coord.ctx.agents.values() if h.alive]) == 1
        again = coord.run()  # the pool grows again on demand
        assert again.ok and again.plugin_figures["pool"]["misses"] == 3
    assert result.ok


def test_drain_leaves_no_process_and_no_zygote(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 6}, pool={"size": 6})
    coord = Coordinator(config)
    coord.open()
    zygote_pid = pool_of(coord).zygote.pid
    coord.run()
    assert len(psutil.Process().children(recursive=True)) >= 7
    coord.close()
    assert psutil.Process().children(recursive=True) == []
    assert not psutil.pid_exists(zygote_pid) or psutil.Process(zygote_pid).status() == psutil.STATUS_ZOMBIE


def test_without_zygote_agents_are_fresh_interpreters_and_still_pooled(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 2, "rounds": 2}, pool={"size": 2, "zygote": False})
    with Coordinator(config) as coord:
        for pid in live_agent_pids(coord).values():
            assert "cfn_core.agent" in psutil.Process(pid).cmdline()
        result = coord.run()
    assert result.ok
    assert result.plugin_figures["pool"]["zygote"] is False
    assert result.plugin_figures["pool"]["hits"] == 4


def test_a_dead_zygote_is_restarted(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 2}, pool={"size": 2})
    with Coordinator(config) as coord:
        pool = pool_of(coord)
        old = pool.zygote.pid
        os.kill(old, signal.SIGKILL)  # its agents die with it (PR_SET_PDEATHSIG)
        pump_until(coord, lambda: not pool.idle or pool.zygote.pid != old)
        result = coord.run()
        assert pool.zygote.pid != old
    assert result.ok and result.rounds[0].agents == 2


def test_a_dead_forker_is_skipped_and_its_agents_replaced(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 4}, pool={"size": 4, "forkers": 2})
    with Coordinator(config) as coord:
        pool = pool_of(coord)
        zygote = pool.zygote
        forker = next(pid for pid in zygote.forker_pids if pid != zygote.pid)
        orphans = [h for h in coord.ctx.agents.values() if psutil.Process(h.pid).ppid() == forker]
        assert orphans
        os.kill(forker, signal.SIGKILL)  # its agents die with it
        pump_until(coord, lambda: all(not h.alive for h in orphans) and len(pool.idle) == 4)
        result = coord.run()
        assert pool.zygote is zygote and zygote.alive  # the other forker goes on
        for h in coord.ctx.agents.values():
            if h.alive:
                assert psutil.Process(h.pid).ppid() == zygote.pid
    assert result.ok and result.rounds[0].agents == 4


def test_exit_status_of_an_agent_that_died_is_known(make_config, no_leaks):
    config = make_config(plugins=["pool"], workload={"agents": 1}, pool={"size": 1, "min_size": 0})
    with Coordinator(config) as coord:
        handle = next(iter(coord.ctx.agents.values()))
        os.kill(handle.pid, signal.SIGKILL)
        pump_until(coord, lambda: not handle.alive)
        assert handle.exit_code == -signal.SIGKILL


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"pool": {"size": -1}}, "[pool] size = -1: must be an integer from 0 to 1000000"),
        ({"pool": {"min_size": 9, "size": 3}}, "[pool] min_size = 9 is larger than [pool] size = 3"),
        ({"pool": {"max_idle": 0}}, "[pool] max_idle = 0: must be a number from 0.001"),
        ({"pool": {"zygote": "yes"}}, "[pool] zygote = 'yes': must be true or false"),
        ({"pool": {"sise": 3}}, "unknown key 'sise' in [pool] (did you mean 'size'?)"),
    ],
)
def test_bad_settings_give_clear_errors(make_config, tables, message):
    from cfn_core import CfnError

    with pytest.raises(CfnError) as info:
        Coordinator(make_config(plugins=["pool"], workload={"agents": 1}, **tables)).open()
    assert message in str(info.value)


def test_environment_names_of_the_plan():
    from cfn_core import CfnError, load_config

    env = {"CFN_POOL_SIZE": "7", "CFN_POOL_MIN_SIZE": "3", "CFN_POOL_MAX_IDLE": "9.5", "CFN_POOL_WARMUP_TIME": "4"}
    s = load_config(None, env=env, discover=False).section("pool")
    assert (s.size, s.min_size, s.max_idle, s.warmup_timeout) == (7, 3, 9.5, 4.0)
    with pytest.raises(CfnError, match=re.escape("environment variable CFN_POOL_SIZE: [pool] size = 'many': must be an integer")):
        load_config(None, env={"CFN_POOL_SIZE": "many"}, discover=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_zygote_warm_up_runs_the_kernel_loop_and_leaves_nothing(make_config, bus_root, no_leaks):
    from cfn_pool.zygote import WARM_UP_TASKS, warm_up

    config = make_config(plugins=["pool"], workload={"agents": 1})
    run_dir = bus_root / "run"
    run_dir.mkdir(mode=0o700)
    assert warm_up(config, str(run_dir)) == WARM_UP_TASKS  # every trivial task answered by the real agent loop
    assert list(run_dir.iterdir()) == []  # its scratch run directory is gone
    run_dir.rmdir()


def test_zygote_warm_up_never_calls_the_users_handler(make_config, pool_env, monkeypatch, no_leaks):
    calls = pool_env / "calls"
    monkeypatch.setenv("CFN_TEST_CALLS", str(calls))  # inherited by the zygote and its agents
    config = make_config(
        plugins=["pool"], workload={"agents": 2, "handler": "pool_test_handlers:record_call"}, pool={"size": 2}
    )
    with Coordinator(config) as coord:
        result = coord.run([Task(id="t0", payload="a"), Task(id="t1", payload="b")])
    assert result.ok
    lines = calls.read_text().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in lines) == ["'a'", "'b'"]  # the two tasks, no warm-up call


def test_a_forked_agents_log_lines_name_the_agent(pool_env, bus_root, tmp_path):
    """The formatter is set up once in the zygote and renamed in each agent: the lines still say whose they are."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core", "run", "--agents", "2", "--plugins", "pool", "--set", "pool.size=2",
         "--set", f"bus.root={bus_root}", "--handler", "pool_test_handlers:log_warning", "--json", "--strict"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stderr.splitlines() if "handler says" in line)
    assert len(lines) == 2, proc.stderr
    assert all(re.fullmatch(r"cfn agent pool-\d{5}: handler says x+", line) for line in lines), lines
    assert len({line.split(":")[0] for line in lines}) == 2  # each agent its own name, not the last one forked


def test_the_zygote_opens_the_runs_bus_for_its_agents_to_adopt(make_config, bus_root, no_leaks):
    from cfn_core import ShmBus, make_plugin_manager
    from cfn_pool.zygote import open_bus_for_forks

    config = make_config(plugins=["pool"], workload={"agents": 1})
    owner = ShmBus.create(str(bus_root))
    try:
        bus = open_bus_for_forks(make_plugin_manager(config), config, owner.run_ref)
        assert isinstance(bus, ShmBus) and bus.run_ref == owner.run_ref
        bus.after_fork()  # what each forked agent does first: it holds nothing of the zygote's
        bus.listen("agent-0001")
        owner.deliver("agent-0001", "inbox/agent-0001", [b'{"x": 1}\n'])
        assert [raw for raw, _ in bus.read("agent-0001", "inbox/agent-0001")] == [b'{"x": 1}\n']
        bus.close()
    finally:
        owner.destroy()


def test_a_bus_that_cannot_be_adopted_after_a_fork_is_closed_and_agents_open_their_own(make_config, bus_root):
    from cfn_core import hookimpl, make_plugin_manager
    from cfn_pool.zygote import open_bus_for_forks

    class NoAfterFork:  # a third-party transport without after_fork
        closed = False

        def close(self):
            self.closed = True

    made = NoAfterFork()

    class Transport:
        @hookimpl(tryfirst=True)
        def cfn_bus(self, config, run_ref):
            return made

    config = make_config(plugins=["pool"], workload={"agents": 1})
    pm = make_plugin_manager(config)
    pm.register(Transport(), "transport")
    assert open_bus_for_forks(pm, config, str(bus_root)) is None
    assert made.closed
