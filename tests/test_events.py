"""The event log (docs/EVENTS.md): what a real coordination writes, and that the docs say exactly that."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cfn_core import Coordinator, hookimpl
from cfn_core import live
from cfn_core.live import StopRequested

ROOT = Path(__file__).resolve().parents[1]
HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = {"v", "ts", "type"}
#: events only a fed coordinator (submit, [[tasks]]) emits; their fields: tests/test_feed.py
FEED_ONLY = ("task_cancelled", "task_skipped")


def documented_fields() -> tuple[set[str], dict[str, set[str]]]:
    """(fields of every line, {event type: its other fields}) from docs/EVENTS.md's tables."""
    text = (ROOT / "docs" / "EVENTS.md").read_text()
    common_part, _, events_part = text.partition("\n## Events\n")
    row = re.compile(r"^\| `(\w+)` \|", re.M)
    common = set(row.findall(common_part.partition("## Every line")[2]))
    types = {}
    for section in re.split(r"^### ", events_part, flags=re.M)[1:]:
        name, _, body = section.partition("\n")
        types[name.strip()] = set(row.findall(body))
    return common, types


class Provoke:
    """Provokes the events a plain run does not: a fallback (cfn_flush raises), an agent
    status (stored as the status-message handler stores it), a stop request in round 2,
    whose tasks then wait for it (``hold``: a round 2 that finished before the coordinator
    saw the stop would not be interrupted)."""

    name = "provoke"

    def __init__(self, hold: Path):
        self.hold = hold

    @hookimpl
    def cfn_flush(self, ctx, reason):
        raise OSError("flusher broke")

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        agent.info["status"] = {"text": "warming up", "fields": {"step": 1}}
        ctx.note_status(agent)

    @hookimpl
    def cfn_coordination_start(self, ctx, round):
        if round == 2:  # what `cfn stop` writes
            self.hold.touch()
            ctx.bus.put_state(live.STOP_KEY, json.dumps({"pid": os.getpid()}).encode())


@pytest.fixture
def handlers_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(HERE)


def test_the_docs_list_exactly_the_fields_every_event_carries(make_config, no_leaks, tmp_path, handlers_on_path, monkeypatch):
    monkeypatch.setattr(live, "MESSAGES_SECONDS", 0.05)  # several `messages` events in a short run
    config = make_config(workload={"agents": 2, "handler": "watch_handlers:mixed", "rounds": 2, "max_attempts": 3})
    hold = tmp_path / "hold"
    tasks = [{"do": "ok"}, {"do": "fail"}, {"do": "die", "marker": str(tmp_path / "died")}, {"do": "ok"}]
    tasks = [dict(t, hold=str(hold)) for t in tasks]
    path = tmp_path / "events.jsonl"
    with pytest.raises(StopRequested):
        with Coordinator(config, events=str(path), extra_plugins=[Provoke(hold)]) as coord:
            coord.run(tasks)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    emitted: dict[str, set[str]] = {}
    for line in lines:
        assert COMMON <= set(line), line
        assert line["v"] == 1 and isinstance(line["ts"], float)
        emitted.setdefault(line["type"], set()).update(set(line) - COMMON)
    common, documented = documented_fields()
    for name in FEED_ONLY:  # a run of rounds never emits them: tests/test_feed.py checks their fields
        documented.pop(name)
    assert common == COMMON
    assert set(emitted) == set(documented), "event types emitted vs documented in docs/EVENTS.md"
    for name in documented:
        assert emitted[name] == documented[name], f"{name}: emitted {sorted(emitted[name])}, documented {sorted(documented[name])}"
    # and they say what happened
    assert lines[0]["type"] == "run_started" and lines[-1]["type"] == "run_finished"
    assert [ln["ts"] for ln in lines] == sorted(ln["ts"] for ln in lines)
    by_type = {}
    for line in lines:
        by_type.setdefault(line["type"], []).append(line)
    retried = by_type["task_retried"]
    assert [r["task"] for r in retried] == ["r1-t000002"] and retried[0]["attempt"] == 2
    assert "died" in retried[0]["reason"]
    assert {(d["task"], d["attempt"]) for d in by_type["task_done"]} == {("r1-t000000", 1), ("r1-t000002", 2), ("r1-t000003", 1)}
    [failed] = by_type["task_failed"]
    assert failed["task"] == "r1-t000001" and "asked to fail" in failed["error"]
    assert by_type["fallback"] == [dict(by_type["fallback"][0], hook="cfn_flush", plugin="provoke", side="coordinator")]
    assert any(e["reason"] == "died" and e["exit_code"] == -9 for e in by_type["agent_exited"])
    assert by_type["agent_status"][0]["text"] == "warming up" and by_type["agent_status"][0]["fields"] == {"step": 1}
    assert by_type["stop_requested"] == [dict(by_type["stop_requested"][0], by=os.getpid())]
    assert [r["interrupted"] for r in by_type["round_finished"]] == [False, True]
    assert lines[-1]["interrupted"] is True and lines[-1]["retried"] == 1 and lines[-1]["failed"] == 1
    assert sum(m["received"] for m in by_type["messages"]) > 0


def test_a_file_object_gets_the_lines_and_stays_open(make_config, no_leaks):
    out = io.StringIO()
    result = Coordinator(make_config(workload={"agents": 2}), events=out).run()
    assert result.ok
    types = [json.loads(line)["type"] for line in out.getvalue().splitlines()]
    assert types.count("task_done") == 2 and types[-1] == "run_finished"
    assert not out.closed


def test_a_session_opened_again_appends_to_its_log(make_config, no_leaks, tmp_path):
    path = tmp_path / "events.jsonl"
    coord = Coordinator(make_config(workload={"agents": 1}), events=path)
    coord.run()
    coord.run()
    types = [json.loads(line)["type"] for line in path.read_text().splitlines()]
    assert types.count("run_started") == types.count("run_finished") == 2


def test_off_nothing_is_written_but_events_are_counted(make_config, no_leaks):
    with Coordinator(make_config(workload={"agents": 2})) as coord:
        coord.run()
        assert not coord.ctx.events.enabled
        assert coord.ctx.events.counts["task_done"] == 2


def _cfn(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "cfn_core", *args], capture_output=True, text=True, cwd=cwd, timeout=300, **kw)


def test_cfn_run_events_to_stdout_keeps_the_summary_on_stderr(bus_root, tmp_path, no_leaks):
    proc = _cfn("run", "--agents", "2", "--events", "-", "--set", f"bus.root={bus_root}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line of stdout is an event
    assert lines[0]["type"] == "run_started" and lines[-1]["type"] == "run_finished"
    assert "cfn run: OK" in proc.stderr


def test_cfn_run_events_file_with_json(bus_root, tmp_path, no_leaks):
    proc = _cfn("run", "--agents", "2", "--json", "--events", "ev.jsonl", "--set", f"bus.root={bus_root}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["delivery_rate"] == 1.0
    assert json.loads((tmp_path / "ev.jsonl").read_text().splitlines()[-1])["type"] == "run_finished"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--events", "-", "--json"], "cfn: error: --events - and --json both write to stdout: give --events a file"),
        (["--events", "/nonexistent/dir/ev.jsonl"], "cfn: error: events file '/nonexistent/dir/ev.jsonl': cannot write it: No such file or directory"),
        (["--events", "."], "cfn: error: events file '.' is a directory"),
    ],
)
def test_cfn_run_refuses_an_events_target_it_cannot_use_in_one_line(args, message, bus_root, tmp_path):
    proc = _cfn("run", "--agents", "2", *args, "--set", f"bus.root={bus_root}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
