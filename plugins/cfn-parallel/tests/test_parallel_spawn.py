"""cfn-parallel with real processes: the window, failure injection with retry, the report, limits, settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import Counter

import psutil
import pytest

from cfn_core import CfnError, Coordinator, hookimpl, load_config


class FlakyLauncher:
    """A coordinator-side plugin whose ``cfn_launch_agent`` misbehaves for chosen agents.

    ``crash[id] = n``: the first ``n`` launches of ``id`` start a process that exits
    with status 7 at once; ``hang[id] = n``: the first ``n`` start a process that
    never says ready.  Every other launch is left to the enabled launcher.
    """

    name = "flaky"

    def __init__(self, crash=None, hang=None):
        self.crash = dict(crash or {})
        self.hang = dict(hang or {})
        self.launches = Counter()

    @hookimpl(tryfirst=True)
    def cfn_launch_agent(self, ctx, agent_id):
        self.launches[agent_id] += 1
        n = self.launches[agent_id]
        if n <= self.crash.get(agent_id, 0):
            code = "import sys; sys.exit(7)"
        elif n <= self.hang.get(agent_id, 0):
            code = "import select; select.select([], [], [])"  # alive, never ready
        else:
            return None
        popen = subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.DEVNULL)
        return ctx.new_handle(agent_id, popen.pid, popen=popen)


def run(make_config, *, plugins=("parallel",), extra=(), agents=6, **tables):
    config = make_config(plugins=list(plugins), workload={"agents": agents}, **tables)
    with Coordinator(config, extra_plugins=list(extra)) as coord:
        return coord.run()


def test_spawns_within_the_window(make_config, no_leaks):
    result = run(make_config, agents=12, parallel={"parallelism": 4, "throttle": False})
    assert result.ok and result.rounds[0].agents == 12
    figures = result.plugin_figures["parallel"]
    assert figures["ready"] == 12 and figures["attempts"] == 12 and figures["failures"] == 0
    assert 1 < figures["max_concurrent"] <= 4


def test_agent_that_crashes_at_start_is_retried(make_config, no_leaks):
    flaky = FlakyLauncher(crash={"agent-0002": 2})
    result = run(make_config, extra=[flaky], agents=4, parallel={"backoff": 0.01})
    assert result.ok and result.rounds[0].agents == 4
    assert flaky.launches["agent-0002"] == 3
    figures = result.plugin_figures["parallel"]
    assert (figures["failures"], figures["retries"], figures["gave_up"]) == (2, 2, 0)
    assert result.rounds[0].spawn_failures == {}


def test_agent_that_hangs_past_the_timeout_is_killed_and_retried(make_config, no_leaks):
    flaky = FlakyLauncher(hang={"agent-0003": 1})
    result = run(make_config, extra=[flaky], agents=4, parallel={"timeout": 2.0, "backoff": 0.01})
    assert result.ok and result.rounds[0].agents == 4
    # (on a very busy machine a healthy agent may time out too and be retried: hence >=)
    assert flaky.launches["agent-0003"] >= 2
    assert result.plugin_figures["parallel"]["retries"] >= 1
    assert result.plugin_figures["parallel"]["gave_up"] == 0


def test_agent_that_never_starts_is_reported_and_the_round_goes_on(make_config, no_leaks):
    flaky = FlakyLauncher(crash={"agent-0002": 99}, hang={"agent-0004": 99})
    result = run(
        make_config, extra=[flaky], agents=5, parallel={"max_retry": 1, "timeout": 2.0, "backoff": 0.01}
    )
    round_ = result.rounds[0]
    assert round_.agents == 3
    assert set(round_.spawn_failures) == {"agent-0002", "agent-0004"}
    assert "exited with status 7 before it was ready (gave up after 2 attempt(s))" in round_.spawn_failures["agent-0002"]
    assert "not ready within 2s (gave up after 2 attempt(s))" in round_.spawn_failures["agent-0004"]
    # the 5 tasks were all done by the 3 agents that started
    assert len(result.results) == 5 and all(r.ok for r in result.results.values())
    assert {r.agent for r in result.results.values()} <= {"agent-0001", "agent-0003", "agent-0005"}
    assert result.plugin_figures["parallel"]["gave_up"] == 2


def test_repeated_failures_fall_back_to_sequential(make_config, no_leaks):
    flaky = FlakyLauncher(crash={f"agent-{i:04d}": 1 for i in range(1, 5)})
    result = run(
        make_config, extra=[flaky], agents=6, parallel={"sequential_after": 3, "backoff": 0.01, "throttle": False}
    )
    assert result.ok and result.rounds[0].agents == 6
    figures = result.plugin_figures["parallel"]
    assert figures["sequential_fallbacks"] == 1 and figures["failures"] == 4


def test_init_timeout_reports_everything_not_ready(make_config, no_leaks):
    flaky = FlakyLauncher(hang={f"agent-{i:04d}": 99 for i in range(1, 4)})
    result = run(
        make_config, extra=[flaky], agents=3, parallel={"init_timeout": 0.5, "timeout": 30.0}
    )
    round_ = result.rounds[0]
    assert round_.agents == 0
    assert all("init_timeout = 0.5s" in why for why in round_.spawn_failures.values())
    assert len(round_.spawn_failures) == 3
    assert all(r.error == "no agent could be started" for r in result.results.values())


def test_with_pool_spawns_go_through_the_zygote(make_config, no_leaks):
    config = make_config(
        plugins=["pool", "parallel"], workload={"agents": 30, "rounds": 2}, pool={"size": 10}, parallel={"parallelism": 8}
    )
    with Coordinator(config) as coord:
        zygote = coord.ctx.state["pool"].zygote
        result = coord.run()
        for h in coord.ctx.agents.values():
            assert psutil.Process(h.pid).ppid() in zygote.forker_pids
    assert result.ok and all(r.agents == 30 for r in result.rounds)
    pool, parallel = result.plugin_figures["pool"], result.plugin_figures["parallel"]
    assert pool["hits"] == 10 + 30 and pool["misses"] == 20
    assert parallel["requested"] == 10 + 20 and parallel["ready"] == 30  # the fill and the misses


def test_resource_limit_is_a_clear_error_before_anything_starts(bus_root):
    """RLIMIT_NPROC lowered (irreversibly, so in a child process) to what is in use plus a few."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        from cfn_parallel.limits import user_tasks
        from cfn_core import Coordinator, CfnError, config_from_dict
        used = user_tasks()
        resource.setrlimit(resource.RLIMIT_NPROC, (used + 5, used + 5))
        config = config_from_dict({{"plugins": ["parallel"], "workload": {{"agents": 200}}, "bus": {{"root": {str(bus_root)!r}}}}})
        try:
            with Coordinator(config) as coord:
                coord.run()
        except CfnError as exc:
            print(type(exc).__name__, exc)
            sys.exit(0)
        sys.exit("no error")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ResourceLimitError starting 200 agent(s) needs 200 more processes")
    assert "RLIMIT_NPROC" in proc.stdout and "ulimit -Hu" in proc.stdout
    assert os.listdir(bus_root) == []


def test_check_limits_names_the_file_limit():
    from cfn_core import ResourceLimitError
    from cfn_parallel.limits import check_limits

    check_limits(10)
    with pytest.raises(ResourceLimitError, match=r"starting 10000000 agent\(s\) \(one pidfd each\) needs about \d+ open files"):
        check_limits(10_000_000)


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"parallel": {"parallelism": 0}}, "[parallel] parallelism = 0: must be an integer from 1 to 100000"),
        ({"parallel": {"timeout": -1}}, "[parallel] timeout = -1: must be a number from 0.01 to 3600.0"),
        ({"parallel": {"max_retry": "3"}}, "[parallel] max_retry = '3': must be an integer from 0 to 100"),
        ({"parallel": {"paralelism": 3}}, "unknown key 'paralelism' in [parallel] (did you mean 'parallelism'?)"),
    ],
)
def test_bad_settings_give_clear_errors(make_config, tables, message):
    with pytest.raises(CfnError) as info:
        make_config(plugins=["parallel"], **tables)
    assert message in str(info.value)


def test_environment_names_of_the_plan():
    env = {"CFN_SPAWN_PARALLELISM": "12", "CFN_SPAWN_MAX_RETRY": "5", "CFN_SPAWN_TIMEOUT": "2.5"}
    s = load_config(None, env=env, discover=False).section("parallel")
    assert (s.parallelism, s.max_retry, s.timeout) == (12, 5, 2.5)
    with pytest.raises(CfnError, match=re.escape("environment variable CFN_SPAWN_PARALLELISM: [parallel] parallelism = '0'")):
        load_config(None, env={"CFN_SPAWN_PARALLELISM": "0"}, discover=False)


def test_with_pool_a_miss_that_crashes_is_retried_and_joins_the_pool(make_config, no_leaks):
    flaky = FlakyLauncher(crash={"pool-00003": 1})
    config = make_config(
        plugins=["pool", "parallel"], workload={"agents": 4, "rounds": 2}, pool={"size": 2}, parallel={"backoff": 0.01}
    )
    with Coordinator(config, extra_plugins=[flaky]) as coord:
        result = coord.run()
        assert "pool-00003" in coord.ctx.state["pool"].members
    assert result.ok and [r.agents for r in result.rounds] == [4, 4]
    assert flaky.launches["pool-00003"] == 2
    assert result.plugin_figures["parallel"]["retries"] == 1
    assert result.plugin_figures["pool"]["misses"] == 2


def _pressured(**kw):
    """Settings under which any machine counts as busy: CPU above 1%, load above 0.01 per CPU."""
    from cfn_parallel import ParallelSettings

    return ParallelSettings(parallelism=64, max_cpu_percent=1.0, max_load=0.01, min_window=4, **kw)


def _samples(throttle, oldest_age: float, samples: int = 4) -> list[int]:
    """The window at ``samples`` successive samples, the CPU kept busy between them (the pressure)."""
    import time

    windows = []
    for _ in range(samples):
        end = time.monotonic() + 0.12  # just past the 100 ms sampling period, spent on the CPU
        while time.monotonic() < end:
            pass
        now = time.monotonic()
        windows.append(throttle.current(now, None if oldest_age is None else now - oldest_age))
    return windows


def test_pressure_holds_back_only_agents_that_are_slow_to_become_ready():
    """The window is for fresh interpreters starved of CPU: agents forked in milliseconds are not held
    at the floor by a busy machine (that only serialized the launches), slow ones still are."""
    from cfn_parallel.throttle import Throttle

    fast = Throttle(_pressured(timeout=5.0))
    fast.begin()
    assert _samples(fast, oldest_age=0.01) == [8, 16, 32, 64]  # slow start, doubled at every sample
    assert fast.engaged == 0
    idle = Throttle(_pressured(timeout=5.0))
    idle.begin()
    assert _samples(idle, oldest_age=None)[-1] == 64  # nothing starting: nothing slow either

    slow = Throttle(_pressured(timeout=5.0))
    slow.begin()
    assert _samples(slow, oldest_age=1.0) == [4, 4, 4, 4]  # 1 s > a tenth of the timeout: pressure counts
    assert slow.engaged == 4


def test_forked_agents_on_a_busy_machine_are_not_throttled(make_config):
    """A pool's zygote forks agents ready in milliseconds: the spawn never cuts its window for them."""
    result = run(
        make_config, plugins=("pool", "parallel"), agents=24, pool={"size": 24},
        parallel={"parallelism": 32, "max_cpu_percent": 1.0, "max_load": 0.01, "timeout": 120.0},
    )
    assert result.ok
    assert result.plugin_figures["parallel"]["throttle_engaged"] == 0, result.plugin_figures["parallel"]
