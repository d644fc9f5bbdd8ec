"""Feeding a coordinator: submit / map / as_completed on real agents, with and without the pool.

Each test starts real agent processes on a private bus root (``make_config``) and proves
with ``no_leaks`` that nothing outlives the ``with`` block.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import CancelledError, as_completed, wait
from pathlib import Path

import pytest

from cfn_core import Cancelled, CfnError, ConfigError, Coordinator, NotJSON, TaskFailed
from cfn_core.testing import wait_for

HERE = Path(__file__).resolve().parent
PLUGIN_SETS = [(), ("pool", "parallel", "batch")]


def _whole_line(path) -> bool:
    """``path`` exists and holds a whole line: a handler's pid, appended (not just created;
    CI once read a marker file empty between its creation and its write)."""
    return path.exists() and path.read_text().endswith("\n")


def _config(make_config, plugins=(), agents=2, **workload):
    tables = {"workload": {"agents": agents, "directory": str(HERE), **workload}}
    if "pool" in plugins:
        tables["pool"] = {"size": agents}
    return make_config(plugins=plugins, **tables)


def _events(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.parametrize("plugins", PLUGIN_SETS, ids=lambda p: "+".join(p) or "baseline")
def test_submit_as_completed_and_map_return_every_result(make_config, no_leaks, plugins):
    config = _config(make_config, plugins, agents=3, prefetch=4)
    with Coordinator(config) as coord:
        futures = [coord.submit({"n": i}) for i in range(300)]
        assert all(f.task_id for f in futures) and len({f.task_id for f in futures}) == 300
        got = sorted(f.result()["n"] for f in as_completed(futures, timeout=120))
        assert got == list(range(300))
        assert list(coord.map(["a", "b", [1, 2], None], timeout=60)) == ["a", "b", [1, 2], None]  # in order
        assert coord.submit(7).result(60) == 7
    (feed_round,) = coord.feed_rounds
    assert feed_round.tasks == 305 and feed_round.failed == 0 and feed_round.agents == 3
    assert feed_round.latency_p50 is not None


def test_pooled_agents_serve_later_submissions_and_run(make_config, no_leaks):
    config = _config(make_config, ("pool",), agents=2, handler="feed_handlers:pid")
    with Coordinator(config) as coord:
        first = {f.result(60)[0] for f in [coord.submit(i) for i in range(20)]}
        later = {f.result(60)[0] for f in [coord.submit(i) for i in range(20)]}
        result = coord.run([1, 2, 3, 4])  # the feed hands its agents back to the pool first
        assert result.ok and {r.value[1] for r in result.results.values()} == {1, 2, 3, 4}
        again = coord.submit("after run").result(60)
    assert len(first) == 2 and later == first  # the same two processes: nothing was respawned
    assert {r.value[0] for r in result.results.values()} <= first and again[0] in first


def test_tasks_submitted_while_others_run_finish_first(make_config, no_leaks, tmp_path):
    config = _config(make_config, ("pool",), agents=2, handler="feed_handlers:gate")
    gate, started = tmp_path / "gate", tmp_path / "started"
    with Coordinator(config) as coord:
        slow = coord.submit({"gate": str(gate), "started": str(started), "value": "slow"})
        wait_for(lambda: _whole_line(started), "the slow task to start")
        open_gate = tmp_path / "open"
        open_gate.touch()
        quick = [coord.submit({"gate": str(open_gate), "value": i}) for i in range(10)]
        assert sorted(f.result(60) for f in quick) == list(range(10))  # the other agent ran them all
        assert not slow.done()
        gate.touch()
        assert slow.result(60) == "slow"


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_bounds_the_tasks_each_agent_holds(make_config, no_leaks, tmp_path, prefetch):
    config = _config(make_config, ("pool",), agents=2, handler="feed_handlers:gate", prefetch=prefetch)
    gate, log = tmp_path / "gate", tmp_path / "events.jsonl"
    with Coordinator(config, events=str(log)) as coord:
        futures = [coord.submit({"gate": str(gate), "value": i}) for i in range(10)]
        wait_for(lambda: coord._feed.in_flight.get("worker") == 2 * prefetch, f"{2 * prefetch} tasks in flight")
        # the coordinator's own count, and what it logged: no more were sent
        coord.ctx.events.flush()
        assert sum(e["type"] == "task_assigned" for e in _events(log)) == 2 * prefetch
        gate.touch()
        assert sorted(f.result(60) for f in futures) == list(range(10))


def test_a_failed_task_raises_task_failed_and_the_feed_goes_on(make_config, no_leaks):
    config = _config(make_config, ("pool",), agents=2, handler="feed_handlers:maybe_fail")
    with Coordinator(config) as coord:
        bad, good = coord.submit("boom"), coord.submit("fine")
        with pytest.raises(TaskFailed, match="boom was asked for") as info:
            bad.result(60)
        assert info.value.task == bad.task_id and info.value.agent.startswith("pool-")
        assert good.result(60) == "fine"


def test_bad_submissions_get_one_clear_error_each(make_config, no_leaks):
    config = _config(make_config, agents=1)
    with Coordinator(config) as coord:
        with pytest.raises(NotJSON, match="payload is not a JSON value"):
            coord.submit({"x": object()})
        with pytest.raises(ConfigError, match="unknown role 'nope'|role 'nope'"):
            coord.submit(1, role="nope")
        with pytest.raises(CfnError, match="no task 'missing' was submitted"):
            coord.cancel("missing")
        first = coord.submit(1, id="job-1")
        with pytest.raises(ConfigError, match="already has a task with that id"):
            coord.submit(2, id="job-1")
        with pytest.raises(ConfigError, match="not a future returned by Coordinator.submit"):
            coord.submit(3, after=["job-1"])
        with Coordinator(_config(make_config, agents=1)) as other:
            foreign = other.submit(4)
            with pytest.raises(ConfigError, match="belongs to another coordinator"):
                coord.submit(5, after=[foreign])
            assert foreign.result(60) == 4
        assert first.result(60) == 1
    with pytest.raises(CfnError, match="the coordinator is closed"):
        coord.submit(6)


def test_submit_to_a_named_agent(make_config, no_leaks):
    config = _config(make_config, agents=3, handler="feed_handlers:pid")
    with Coordinator(config) as coord:
        pids = {f.result(60)[0] for f in [coord.submit(i, to="agent-0002") for i in range(6)]}
        assert len(pids) == 1
        with pytest.raises(TaskFailed, match="no such agent"):
            coord.submit(0, to="agent-0009").result(60)


STREAM = textwrap.dedent(
    """
    import os, sys
    from concurrent.futures import as_completed
    from cfn_core import Coordinator, load_config
    sys.path.insert(0, {here!r})
    config = load_config(None, overrides={{"plugins": {plugins!r}, "workload.agents": "2", "pool.size": "2",
        "workload.directory": {here!r}, "workload.handler": "feed_handlers:gate", "bus.root": {root!r}}})
    with Coordinator(config) as coord:
        futures = [coord.submit({{"gate": "/nonexistent", "started": {started!r}}}) for _ in range(4)]
        for f in as_completed(futures):
            print(f.result())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_blocked_in_as_completed_stops_everything(bus_root, tmp_path, no_leaks, sig):
    started = tmp_path / "started"
    script = STREAM.format(here=str(HERE), plugins="pool", root=str(bus_root), started=str(started))
    # SIGTERM: the script's own handler makes it a KeyboardInterrupt, as `cfn run`'s does
    if sig == signal.SIGTERM:
        script = "import signal\ndef _term(*a): raise KeyboardInterrupt\nsignal.signal(signal.SIGTERM, _term)\n" + script
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: started.exists() and started.read_text().count("\n") == 2, "both agents to run a task")
        agents = [int(p) for p in started.read_text().split()]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    wait_for(lambda: not any(_alive(p) for p in agents), "the agents to be gone")
    assert not list(bus_root.iterdir())  # the run directory was removed


LEAVING = textwrap.dedent(
    """
    import sys
    from cfn_core import Coordinator, load_config
    sys.path.insert(0, {here!r})
    config = load_config(None, overrides={{"plugins": "pool", "workload.agents": "1", "pool.size": "1",
        "workload.directory": {here!r}, "workload.handler": "feed_handlers:gate", "bus.root": {root!r}}})
    with Coordinator(config) as coord:
        coord.submit({{"gate": "/nonexistent", "started": {started!r}}})
    """
)


def test_ctrl_c_while_the_with_block_waits_for_its_tasks(bus_root, tmp_path, no_leaks):
    started = tmp_path / "started"
    script = LEAVING.format(here=str(HERE), root=str(bus_root), started=str(started))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _whole_line(started), "the task to run while the block waits for it")
        agent = int(started.read_text())
        proc.send_signal(signal.SIGINT)  # leaving the block waits for the task: Ctrl-C must still end it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    wait_for(lambda: not _alive(agent), "the agent to be gone")
    assert not list(bus_root.iterdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------- cancellation


def test_future_cancel_of_a_queued_task(make_config, no_leaks, tmp_path):
    config = _config(make_config, ("pool",), agents=1, handler="feed_handlers:gate")
    gate, log = tmp_path / "gate", tmp_path / "events.jsonl"
    with Coordinator(config, events=str(log)) as coord:
        running = coord.submit({"gate": str(gate), "value": 1})
        queued = coord.submit({"gate": str(gate), "value": 2})
        wait_for(lambda: running.running(), "the first task to be sent")
        assert queued.cancel() and queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(0)
        gate.touch()
        assert running.result(60) == 1
        assert coord.submit({"gate": str(gate), "value": 3}).result(60) == 3
    (r,) = coord.feed_rounds
    assert r.results[queued.task_id].cancelled and not r.results[running.task_id].cancelled
    cancelled = [e for e in _events(log) if e["type"] == "task_cancelled"]
    assert [(e["task"], e["running"]) for e in cancelled] == [(queued.task_id, False)]
    assert not any(e["type"] == "task_failed" for e in _events(log))


def test_cancel_a_running_python_handler_at_its_next_agent_call(make_config, no_leaks, tmp_path):
    config = _config(make_config, ("pool",), agents=1, handler="feed_handlers:cooperative", cancel_grace=60)
    started = tmp_path / "started"
    with Coordinator(config) as coord:
        f = coord.submit({"started": str(started)})
        wait_for(lambda: _whole_line(started), "the handler to start")
        pid = int(started.read_text())
        assert coord.cancel(f.task_id) is True
        with pytest.raises(Cancelled):
            f.result(60)
        assert isinstance(f.exception(), CancelledError)
        # the agent stopped the handler itself (no kill: same process) and takes the next task
        started.unlink()
        g = coord.submit({"started": str(started)})
        wait_for(lambda: _whole_line(started), "the next task to start")
        assert int(started.read_text()) == pid
        assert coord.cancel(g.task_id)
        with pytest.raises(Cancelled):
            g.result(60)
        assert coord.cancel(g.task_id) is False  # finished: nothing to cancel
    (r,) = coord.feed_rounds
    assert r.results[f.task_id].cancelled and (r.cancelled, r.failed) == (2, 0)  # cancelled, not failed
    assert r.duplicates == 0 and r.retries == 0


def test_cancel_a_running_command_kills_its_process_group(make_config, no_leaks, tmp_path):
    marker = tmp_path / "child"
    command = f'p=$(cat); if [ "$p" = x ]; then sleep 300 & echo $! > {marker}; wait; else echo "ran $p"; fi'
    config = _config(make_config, ("pool",), agents=1, command=command, cancel_grace=60)
    with Coordinator(config) as coord:
        f = coord.submit("x")
        wait_for(lambda: marker.exists() and marker.read_text().strip(), "the command to start")
        child = int(marker.read_text())
        assert coord.cancel(f.task_id)
        with pytest.raises(Cancelled):
            f.result(60)
        wait_for(lambda: not _alive(child), "the command's child to be killed")
        assert coord.submit("y").result(60).strip() == "ran y"  # the same agent goes on
    (r,) = coord.feed_rounds
    assert r.retries == 0  # the agent itself stopped it: not killed, nothing retried


def test_a_handler_that_ignores_cancel_is_killed_after_the_grace_period(make_config, no_leaks, tmp_path):
    config = _config(make_config, ("pool",), agents=1, handler="feed_handlers:stubborn", cancel_grace=0.5)
    started = tmp_path / "started"
    log = tmp_path / "events.jsonl"
    with Coordinator(config, events=str(log)) as coord:
        f = coord.submit({"started": str(started)})
        wait_for(lambda: _whole_line(started), "the handler to start")
        pid = int(started.read_text())
        assert coord.cancel(f.task_id)
        with pytest.raises(Cancelled):
            f.result(60)
        wait_for(lambda: not _alive(pid), "the stubborn agent to be killed")
        started.unlink()
        g = coord.submit({"started": str(started)})  # its replacement runs the next task
        wait_for(lambda: _whole_line(started), "the replacement to run a task")
        assert int(started.read_text()) != pid
        coord.cancel(g.task_id)
    coord_events = _events(log)
    exits = [e for e in coord_events if e["type"] == "agent_exited" and e["pid"] == pid]
    assert exits and exits[0]["reason"] == "killed" and "was cancelled and did not stop" in exits[0]["why"]


def test_submit_timeout_fails_a_task_that_runs_too_long(make_config, no_leaks, tmp_path):
    config = _config(make_config, ("pool",), agents=1, handler="feed_handlers:cooperative")
    with Coordinator(config) as coord:
        f = coord.submit({}, timeout=0.5)
        with pytest.raises(TaskFailed, match="exceeded its timeout of 0.5s"):
            f.result(60)
        assert not f.cancelled()


def test_cancel_on_another_coordinators_task_id_is_an_error(make_config, no_leaks):
    config = _config(make_config, agents=1)
    with Coordinator(config) as coord:
        f = coord.submit(1)
        f.result(60)
        assert coord.cancel(f.task_id) is False
        with pytest.raises(CfnError, match="no task 't999999' was submitted"):
            coord.cancel("t999999")


def test_waiting_on_everything(make_config, no_leaks):
    config = _config(make_config, ("pool",), agents=2)
    with Coordinator(config) as coord:
        futures = [coord.submit(i) for i in range(50)]
        done, not_done = wait(futures, timeout=120)
        assert not not_done and sorted(f.result() for f in done) == list(range(50))
        more = [coord.submit(i) for i in range(5)]
        assert sorted(f.result() for f in coord.as_completed(timeout=60)) == list(range(5))
        assert all(f.done() for f in more)


def test_as_completed_yields_what_finished_before_it_was_called_and_each_task_once(make_config, no_leaks):
    config = _config(make_config, ("pool",), agents=2)
    with Coordinator(config) as coord:
        early = coord.submit("early")
        wait([early], timeout=60)  # finished, its result not taken
        assert early.done()
        taken = coord.submit("taken")
        assert taken.result(60) == "taken"
        late = [coord.submit(i) for i in range(3)]
        yielded = list(coord.as_completed(timeout=60))
        assert sorted(f.task_id for f in yielded) == sorted(f.task_id for f in [early, *late])
        assert list(coord.as_completed(timeout=60)) == []  # each task once
        again = coord.submit("again")
        assert [f.result() for f in coord.as_completed(timeout=60)] == ["again"]
        assert again.done()


def test_the_docs_list_exactly_the_fields_of_the_feeds_events(make_config, no_leaks, tmp_path):
    sys.path.insert(0, str(HERE))
    from test_events import COMMON, FEED_ONLY, documented_fields

    config = _config(make_config, ("pool",), agents=1, handler="feed_handlers:gate")
    gate, log = tmp_path / "gate", tmp_path / "events.jsonl"
    with Coordinator(config, events=str(log)) as coord:
        running = coord.submit({"gate": str(gate)})
        queued = coord.submit({"gate": str(gate)})
        child = coord.submit({"gate": str(gate)}, after=[queued])
        wait_for(running.running, "the first task to be sent")
        queued.cancel()
        coord.cancel(running.task_id)
        with pytest.raises(TaskFailed):
            child.result(60)
        gate.touch()
    emitted: dict[str, set[str]] = {}
    for line in _events(log):
        emitted.setdefault(line["type"], set()).update(set(line) - COMMON)
    _common, documented = documented_fields()
    for name in FEED_ONLY:
        assert emitted[name] == documented[name], f"{name}: emitted {sorted(emitted[name])}, documented {sorted(documented[name])}"
    assert {e["task"]: e["running"] for e in _events(log) if e["type"] == "task_cancelled"} == {
        queued.task_id: False, running.task_id: True}
