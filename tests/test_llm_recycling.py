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
