"""Agents SIGKILLed at random moments: every task completes exactly once, retries are counted.

Two ways of killing, both real ``SIGKILL`` of real agent processes:

* from inside: 10% of the tasks make the agent running them kill itself the
  first time (a marker file remembers), so the death lands exactly while the
  task is outstanding, possibly with more tasks queued behind it;
* from outside: a test plugin's ``cfn_tick`` (called from the coordinator's
  event loop in every phase) SIGKILLs a random busy agent each time the
  number of collected results passes one of 10%-of-agents random thresholds.

The default run keeps N small (the baseline starts a fresh interpreter per
agent, ~0.1 s each on this machine); the 500-agent runs are marked ``slow``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import fault_env, plugin_params, plugin_sets, read_log, set_id  # noqa: E402,F401

from cfn_core import Coordinator, Task, hookimpl  # noqa: E402


def _config(make_config, plugins, agents, **workload):
    tables = {"workload": {"agents": agents, "timeout": 60.0, **workload}}
    if "pool" in plugins:
        tables["pool"] = {"size": agents}
    return make_config(plugins=plugins, **tables)


def _check_exactly_once(result, tasks):
    """Every task has exactly one result, from an agent, ok, carrying its own key."""
    assert set(result.results) == {t.id for t in tasks}
    for t in tasks:
        r = result.results[t.id]
        assert r.ok, (t.id, r.error)
        assert r.answered
        assert r.value == t.payload["key"]
    (round_,) = result.rounds
    assert round_.planned == round_.delivered == 2 * len(tasks)
    assert result.delivery_rate == 1.0
    return round_


def _self_kill_run(make_config, scratch, plugins, agents, per_agent):
    rng = random.Random(1234)
    count = agents * per_agent
    doomed = set(rng.sample(range(count), max(1, agents // 10)))
    tasks = [
        Task(id=f"t{i:05d}", payload={"key": f"t{i:05d}", "dir": str(scratch), "kill": i in doomed}) for i in range(count)
    ]
    config = _config(make_config, plugins, agents, handler="test_faults_handlers:kill_once")
    with Coordinator(config) as coord:
        result = coord.run(tasks)
    round_ = _check_exactly_once(result, tasks)
    log = read_log(scratch)
    kills = [(k, pid) for what, k, pid in log if what == "kill"]
    # exactly one SIGKILL per doomed task, each a different process
    assert sorted(k for k, _ in kills) == sorted(f"t{i:05d}" for i in doomed)
    assert len({pid for _, pid in kills}) == len(doomed)
    starts = Counter(k for what, k, _ in log if what == "start")
    for i in doomed:
        assert starts[f"t{i:05d}"] >= 2  # it really ran again after the kill
    # each death charged exactly one attempt to the task that was running
    charged = {k: r.attempts for k, r in result.results.items() if r.attempts > 1}
    # (with a batching plugin too: the agent flushes a finished result before the next handler runs)
    assert charged == {f"t{i:05d}": 2 for i in doomed}
    # every task that was outstanding on a dead agent was handed to its replacement and counted
    assert round_.retries >= len(doomed)
    print(f"\nself-kill {set_id(plugins)}: {agents} agents, {count} tasks, {len(doomed)} SIGKILLed, "
          f"retries {round_.retries}, duplicates dropped {round_.duplicates}, "
          f"delivered {round_.delivered}/{round_.planned}, {result.seconds:.1f}s")
    return result, len(doomed)


@pytest.mark.parametrize("plugins", plugin_params())
def test_self_killed_agents_every_task_exactly_once(make_config, fault_env, no_leaks, plugins):
    _self_kill_run(make_config, fault_env, plugins, agents=20, per_agent=3)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the baseline starts 500 fresh interpreters one by one: 300 s is not enough in CI
@pytest.mark.parametrize("plugins", [p for p in plugin_sets() if "pool" in p] + [()], ids=set_id)
def test_500_agents_10_percent_self_killed(make_config, fault_env, no_leaks, plugins):
    result, killed = _self_kill_run(make_config, fault_env, plugins, agents=500, per_agent=2)
    assert killed == 50
    print(f"\n500 agents {set_id(plugins)}: {killed} killed, retries {result.rounds[0].retries}, "
          f"duplicates {result.rounds[0].duplicates}, {result.seconds:.1f}s")


class _Killer:
    """A plugin (registered through ``extra_plugins``) whose ``cfn_tick``, called from the
    coordinator's event loop in every phase, SIGKILLs random busy agents at random ticks."""

    def __init__(self, agents: int, tasks: int, seed: int = 7):
        self.rng = random.Random(seed)
        self.quota = max(1, agents // 10)
        # the moments: after how many collected results each kill happens (the first 25%: a
        # coordinator starved of CPU ticks late, and once every agent is on its last task a late
        # tick finds too few busy agents left to kill; seen in CI with 40%, 48 of 50 killed)
        self.moments = sorted(self.rng.randrange(0, int(tasks * 0.25)) for _ in range(self.quota))
        self.killed: list[tuple[str, int]] = []

    @hookimpl
    def cfn_tick(self, ctx, now):
        r = ctx._round
        if r is None:
            return
        dead_ids = {a for a, _ in self.killed}
        while self.moments and len(r.results) >= self.moments[0]:
            busy = [
                h for h in ctx.agents.values()
                if h.alive and h.state == "ready" and h.outstanding and h.id not in dead_ids and h.pid
            ]
            if not busy:
                return
            victim = self.rng.choice(busy)
            os.kill(victim.pid, signal.SIGKILL)
            self.killed.append((victim.id, victim.pid))
            dead_ids.add(victim.id)
            self.moments.pop(0)


def _external_kill_run(make_config, scratch, plugins, agents, per_agent, work):
    count = agents * per_agent
    tasks = [Task(id=f"t{i:05d}", payload={"key": f"t{i:05d}", "dir": str(scratch), "work": work}) for i in range(count)]
    config = _config(make_config, plugins, agents, handler="test_faults_handlers:kill_once")
    killer = _Killer(agents, count)
    with Coordinator(config, extra_plugins=[killer]) as coord:
        result = coord.run(tasks)
    round_ = _check_exactly_once(result, tasks)
    assert len(killer.killed) == killer.quota, "the killer found too few busy agents"
    charged = sum(r.attempts - 1 for r in result.results.values())
    # a victim whose result was already on the bus is not charged; every other death charges one
    # task.  On a loaded machine the coordinator reads late, so every victim may have written its
    # result before it was killed (charged 0, seen under load): exactly-once above is the guarantee
    assert charged <= len(killer.killed)
    assert round_.retries >= charged
    print(f"\nexternal kill {set_id(plugins)}: {agents} agents, {count} tasks, {len(killer.killed)} SIGKILLed, "
          f"charged {charged}, retries {round_.retries}, duplicates dropped {round_.duplicates}, "
          f"delivered {round_.delivered}/{round_.planned}, {result.seconds:.1f}s")
    return result, killer


@pytest.mark.parametrize("plugins", plugin_params())
def test_agents_killed_from_outside_every_task_exactly_once(make_config, fault_env, no_leaks, plugins):
    _external_kill_run(make_config, fault_env, plugins, agents=20, per_agent=4, work=0.05)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the baseline starts 500 fresh interpreters one by one: 300 s is not enough in CI
@pytest.mark.parametrize("plugins", [p for p in plugin_sets() if "pool" in p] + [()], ids=set_id)
def test_500_agents_10_percent_killed_from_outside(make_config, fault_env, no_leaks, plugins):
    result, killer = _external_kill_run(make_config, fault_env, plugins, agents=500, per_agent=2, work=0.5)
    r = result.rounds[0]
    print(f"\n500 agents {set_id(plugins)}: {len(killer.killed)} killed, retries {r.retries}, "
          f"duplicates {r.duplicates}, charged {sum(x.attempts - 1 for x in result.results.values())}, "
          f"{result.seconds:.1f}s")
