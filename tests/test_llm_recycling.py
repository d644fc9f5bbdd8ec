"""Recycling: ``[workload] max_tasks`` and ``max_rss_mb`` replace agent processes between tasks, losing nothing."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from cfn_core import Coordinator

HERE = Path(__file__).resolve().parent


@pytest.fixture
def handlers_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(HERE))


def per_process(result) -> Counter:
    assert result.ok, {k: r.error for k, r in result.results.items() if not r.ok}
    return Counter(r.value for r in result.results.values())


def test_a_20_agent_pool_with_max_tasks_5_over_200_tasks(make_config, tmp_path, no_leaks, handlers_on_path):
    events = tmp_path / "events.jsonl"
    config = make_config(
        plugins=("pool",), pool={"size": 20},
        workload={"agents": 20, "handler": "llm_handlers:pid_of", "max_tasks": 5, "max_attempts": 1},
    )
    with Coordinator(config, events=str(events)) as coord:
        result = coord.run(list(range(200)))
        # each successor took its predecessor's place: the pool did not also refill for it
        alive = [h for h in coord.ctx.agents.values() if h.alive]
        assert len(alive) <= 20 and {h.id for h in alive} <= {f"pool-{i:05d}" for i in range(1, 21)}, sorted(h.id for h in alive)
    runs = per_process(result)
    assert len(result.results) == 200 and sum(runs.values()) == 200  # nothing lost, nothing twice
    assert max(runs.values()) <= 5 and len(runs) >= 40  # no process ran more than 5
    assert {r.attempts for r in result.results.values()} == {1}  # a recycle is not an attempt
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    relaunched = [e for e in lines if e["type"] == "agent_started" and e["incarnation"] > 1]
    assert len(relaunched) >= 20
    assert not [e for e in lines if e["type"] == "task_retried"]


def test_queued_tasks_survive_the_recycle(make_config, no_leaks, handlers_on_path):
    # the baseline queues 5 tasks on each agent at once: each process runs 3, its successor the rest
    config = make_config(workload={"agents": 4, "handler": "llm_handlers:pid_of", "max_tasks": 3, "max_attempts": 1})
    with Coordinator(config) as coord:
        result = coord.run(list(range(20)))
    runs = per_process(result)
    assert sum(runs.values()) == 20 and max(runs.values()) <= 3 and len(runs) >= 8


def test_max_rss_mb_replaces_a_growing_agent(make_config, no_leaks, handlers_on_path):
    config = make_config(workload={"agents": 2, "handler": "llm_handlers:leaky", "max_rss_mb": 100, "max_attempts": 1})
    with Coordinator(config) as coord:
        result = coord.run(list(range(10)))
    runs = per_process(result)
    # 40 MiB kept per task over a ~30 MiB interpreter: a process passes 100 MiB after its 2nd task
    assert sum(runs.values()) == 10 and max(runs.values()) <= 2 and len(runs) >= 5


def _tree_pss_mib() -> float:
    import psutil

    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:  # ended between the listing and the read (a recycled agent)
            pass
    return total / 2**20


@pytest.mark.bench
def test_recycling_keeps_the_pools_memory_flat(make_config, no_leaks, handlers_on_path):
    """20 pooled agents, max_tasks = 5, ten rounds of 20 tasks: the pool's PSS after each round stays flat.

    A recycled agent is a fresh fork of the zygote: what a process accumulated leaves with
    it.  Measured after each round (the agents idle), not timed; the bound is generous
    (the first round's figure plus half), the figures are printed for the docs.
    """
    config = make_config(
        plugins=("pool",), pool={"size": 20},
        workload={"agents": 20, "handler": "llm_handlers:pid_of", "max_tasks": 5, "max_attempts": 1},
    )
    figures = []
    with Coordinator(config) as coord:
        for rnd in range(10):
            per_process(coord.run(list(range(rnd * 20, rnd * 20 + 20))))
            figures.append(_tree_pss_mib())
    print(f"\npool PSS after each round (MiB, 20 agents, max_tasks 5): {[round(f, 1) for f in figures]}")  # -s shows it
    assert max(figures) <= figures[0] * 1.5, figures
