"""The failure policy of LLM-CLI swarms: rate limits (not attempts), retryable and fatal exits, stalls, timeouts.

Real command agents running tests/llm_fake_cli.py and Python handlers raising RateLimited.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from cfn_core import Coordinator

HERE = Path(__file__).resolve().parent
FAKE = HERE / "llm_fake_cli.py"


@pytest.fixture
def handlers_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(HERE))


def command(mode, logdir):
    return f"{sys.executable} {FAKE} {mode} {logdir}"


def calls(logdir: Path) -> list[list[str]]:
    return [line.split(" ", 1) for line in (logdir / "calls").read_text().splitlines()]


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("plugins", [("limits",), ("pool", "parallel", "limits")], ids=["baseline", "pool"])
def test_a_cli_answering_429_to_30_percent_of_calls_completes_every_task(make_config, tmp_path, no_leaks, plugins):
    log = tmp_path / "log"
    log.mkdir()
    events = tmp_path / "events.jsonl"
    config = make_config(
        plugins=plugins, pool={"size": 8},
        workload={"agents": 8, "command": command("flaky429", log), "rate_limit_pattern": r"\b429\b", "max_attempts": 1,
                  "retry_backoff": 0.05, "retry_backoff_max": 0.5},
        limits={"rate": 40.0, "burst": 4, "aimd_step": 0.02, "aimd_cooldown": 0.2},
    )
    with Coordinator(config, events=str(events)) as coord:
        result = coord.run([f"prompt {i}" for i in range(80)])
    answers = [c for c in calls(log)]
    refused = sum(1 for _, what in answers if what == "429")
    assert refused >= 5, refused  # the fake did refuse (30% of calls)
    assert result.ok and result.failed == 0, {k: v.error for k, v in result.results.items() if not v.ok}
    # not charged as attempts: every result is the first attempt, even with max_attempts = 1
    assert {r.attempts for r in result.results.values()} == {1}
    done = Counter(task for task, what in answers if what == "ok")
    assert len(done) == 80 and set(done.values()) == {1}
    lines = events_of(events)
    requeued = [e for e in lines if e["type"] == "task_retried"]
    assert len(requeued) == refused and all("rate limited (not charged" in e["reason"] for e in requeued)
    f = result.plugin_figures["limits"]
    assert f["rate_limited"] == refused and f["aimd_decreases"] >= 1
    assert f["min_rate_factor"] < 1.0 and f["rate_factor"] > f["min_rate_factor"]  # dropped, then recovered


def test_rate_limited_from_python_is_requeued_with_retry_after(make_config, tmp_path, no_leaks, handlers_on_path):
    config = make_config(workload={"agents": 3, "handler": "llm_handlers:rate_limited_once", "max_attempts": 1})
    with Coordinator(config) as coord:
        result = coord.run([{"dir": str(tmp_path), "n": i} for i in range(9)])
    assert result.ok, [r.error for r in result.results.values()]
    assert sorted(r.value for r in result.results.values()) == list(range(9))
    assert {r.attempts for r in result.results.values()} == {1}


def test_retry_on_exit_retries_and_charges_an_attempt(make_config, tmp_path, no_leaks):
    log = tmp_path / "log"
    log.mkdir()
    config = make_config(workload={"agents": 3, "command": command("exit75", log), "retry_on_exit": [75], "max_attempts": 3, "retry_backoff": 0.01})
    with Coordinator(config) as coord:
        result = coord.run([f"p{i}" for i in range(6)])
    assert result.ok
    assert {r.attempts for r in result.results.values()} == {2}
    assert {r.value for r in result.results.values()} == {"answer after a retry\n"}
    assert result.rounds[0].retries == 6


def test_fatal_on_exit_fails_at_once_even_when_others_retry(make_config, tmp_path, no_leaks):
    log = tmp_path / "log"
    log.mkdir()
    config = make_config(workload={"agents": 2, "command": command("exit75", log), "fatal_on_exit": [75], "on_other_exit": "retry", "max_attempts": 3})
    with Coordinator(config) as coord:
        result = coord.run(["a", "b"])
    assert result.failed == 2
    assert {r.attempts for r in result.results.values()} == {1}
    assert all("command exited with status 75: temporary failure, try again" in r.error for r in result.results.values())
    assert len(calls(log)) == 2


def fake_processes(log: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (cmd[:2] == ["sleep", "600"] and p.ppid() != 1) or (len(cmd) >= 4 and cmd[1] == str(FAKE) and cmd[3] == str(log)):
            out.append(p.pid)
    return out


def test_a_silent_command_is_caught_by_stall_and_a_chatty_one_by_timeout(make_config, tmp_path, no_leaks):
    log = tmp_path / "log"
    log.mkdir()
    events = tmp_path / "events.jsonl"
    config = make_config(
        # stall_seconds is well above an interpreter's start on a loaded machine (CI once saw
        # the chatty command silent for over 0.5 s before its first line) and timeout above
        # stall_seconds + stall_kill_seconds, so which limit ends each command is not a race
        workload={"agents": 2, "command": f"{sys.executable} {FAKE} $(head -c 6) {log}", "timeout": 8.0,
                  "stall_seconds": 2.0, "stall_kill_seconds": 0.5, "max_attempts": 2, "retry_backoff": 0.01},
    )
    with Coordinator(config, events=str(events)) as coord:
        result = coord.run(["hang  ", "chatty"])
    hang, chatty = (result.results[t] for t in sorted(result.results))
    # the wedged CLI: marked stalled, killed after stall_kill_seconds, retried once, then given up
    assert not hang.ok and hang.attempts == 2
    assert hang.error.startswith("command stalled: no output for 2.5s"), hang.error
    assert "[earlier attempts: 1: command stalled" in hang.error
    # the one that prints forever is never stalled: the task timeout ends it, not retried
    assert not chatty.ok and chatty.attempts == 1 and chatty.error == "command timed out after 8s"
    lines = events_of(events)
    stalled = [e for e in lines if e["type"] == "agent_status" and e["text"] == "stalled"]
    hang_id = sorted(result.results)[0]
    assert [e["fields"]["task"] for e in stalled] == [hang_id, hang_id]  # once per attempt, never the chatty one
    assert all(e["fields"]["silent_seconds"] >= 2.0 for e in stalled)
    assert [c[1] for c in calls(log)].count("hang") == 2 and [c[1] for c in calls(log)].count("chatty") == 1
    assert fake_processes(log) == []  # killed with their process groups


def test_command_max_rss_mb_names_out_of_memory(make_config, tmp_path, no_leaks):
    hog = f"{sys.executable} -c 'x = bytearray(400 << 20); print(len(x))'"
    config = make_config(workload={"agents": 1, "command": hog, "command_max_rss_mb": 200})
    with Coordinator(config) as coord:
        result = coord.run(["go"])
    [r] = result.results.values()
    assert not r.ok and r.error.startswith("out of memory: command exceeded command_max_rss_mb = 200"), r.error
    assert "MemoryError" in r.stderr


def test_a_silent_python_handler_is_stalled_one_that_reports_is_not(make_config, tmp_path, no_leaks, handlers_on_path):
    events = tmp_path / "events.jsonl"
    config = make_config(
        agents={"slow": {"count": 1, "handler": "llm_handlers:reporting"}, "stuck": {"count": 1, "handler": "llm_handlers:silent"}},
        # the reporting handler runs 3 s, three times stall_seconds, with a status every 0.1 s:
        # a gap of 1 s between two of them would take a far worse machine than CI's
        workload={"stall_seconds": 1.0, "stall_kill_seconds": 0.4, "max_attempts": 2, "timeout": 120.0},
    )
    from cfn_core import Task

    with Coordinator(config, events=str(events)) as coord:
        result = coord.run([Task(id="slow", payload=None, role="slow"), Task(id="stuck", payload=None, role="stuck")])
    assert result.results["slow"].ok and result.results["slow"].attempts == 1
    stuck = result.results["stuck"]
    assert not stuck.ok and stuck.attempts == 2
    assert "task stuck stalled: no status or message from its agent for" in stuck.error, stuck.error
    lines = events_of(events)
    marks = [e for e in lines if e["type"] == "agent_status" and e["text"] == "stalled"]
    assert {e["agent"] for e in marks} == {"stuck-0001"} and len(marks) == 2  # once per attempt
