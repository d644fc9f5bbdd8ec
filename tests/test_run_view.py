"""`cfn run`'s compact live view: in a real terminal (tmux) while a run works, gone after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from cfn_core.run_view import compact_lines

HERE = os.path.dirname(os.path.abspath(__file__))


def _snapshot(now, agents):
    return {
        "v": 1, "written_at": now, "coordinator_pid": 1, "run": "/dev/shm/cfn-x", "started_at": now - 10, "round": 1,
        "agents": agents,
        "by_state": {"busy": sum(a["task"] is not None for a in agents)},
        "by_role": {"worker": {"busy": 3, "ready": 1}, "critic": {"busy": 4}},
        "tasks": {"queued": 20, "done": 7, "failed": 2, "retried": 1},
        "throughput": 3.25, "latency_p50": 0.0123,
    }


def _agent(i, task=None, elapsed=None, quiet=0.0, status=None):
    return {"id": f"agent-{i:04d}", "role": "worker", "state": "busy" if task else "ready", "pid": 100 + i,
            "incarnation": 1, "task": task, "elapsed": elapsed, "quiet": quiet, "status": status,
            "messages_in": 1, "messages_out": 0}


def test_the_compact_lines_count_list_the_longest_tasks_and_mark_stalls():
    now = time.time()
    agents = [_agent(i, f"t{i}", elapsed=float(i), quiet=float(i) * 10, status="thinking" if i == 7 else None)
              for i in range(1, 9)] + [_agent(9)]
    lines = compact_lines(_snapshot(now, agents), now=now, rows=3, stall_seconds=60.0)
    assert lines[0] == "agents 9  critic: 4 busy  worker: 3 busy, 1 ready"
    # quiet 60, 70 and 80 s: three of the busy agents look stalled at 60 s
    assert lines[1] == "tasks 7 done, 2 failed, 1 retried, 20 queued   3.2 tasks/s   p50 12.3ms   stalled 3"
    assert lines[2].split() == ["agent-0008", "worker", "t8", "8.0s"]  # the longest-running first
    assert lines[3].split() == ["agent-0007", "worker", "t7", "7.0s", "thinking"]
    assert lines[5] == "  ... and 5 more busy agents (cfn top shows them all)" and len(lines) == 6


def _tmux(socket, *args):
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=60)


def _wait_screen(socket, predicate, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _tmux(socket, "capture-pane", "-p").stdout
        if predicate(screen):
            return screen
        time.sleep(0.1)  # a terminal another process draws: nothing to block on
    raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_cfn_run_on_a_terminal_draws_the_view_and_removes_it_for_the_summary(bus_root, tmp_path, no_leaks):
    socket = f"cfntest-{os.getpid()}-{os.urandom(3).hex()}"
    command = (
        f"env -u NO_COLOR PYTHONPATH={HERE} TERM=xterm-256color {sys.executable} -m cfn_core run --agents 6"
        f" --handler watch_handlers:slow --set bus.root={bus_root}; echo EXITED $?; sleep 600"
    )
    started = _tmux(socket, "new-session", "-d", "-x", "160", "-y", "40", "-c", str(tmp_path), command)
    assert started.returncode == 0, started.stderr
    try:
        during = _wait_screen(socket, lambda s: s.count(" worker  r1-t0000") == 5, "five busy agents in the view")
        assert "agents 6  worker: 6 busy" in during
        assert "tasks 0 done, 0 failed, 0 retried, 6 queued" in during and "stalled 0" in during
        assert "... and 1 more busy agents (cfn top shows them all)" in during
        stop = subprocess.run([sys.executable, "-m", "cfn_core", "stop", "--root", str(bus_root)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert stop.returncode == 0, stop.stderr
        after = _wait_screen(socket, lambda s: "EXITED" in s, "cfn run's exit")
        assert "EXITED 143" in after and "cfn run: INTERRUPTED" in after
        # the view is gone: the summary stands alone
        assert "tasks/s" not in after and "r1-t0000" not in after and "collect    [" not in after
    finally:
        _tmux(socket, "kill-server")


def test_not_a_terminal_gets_no_view(bus_root, tmp_path, no_leaks):
    run = subprocess.run([sys.executable, "-m", "cfn_core", "run", "--agents", "2", "--set", f"bus.root={bus_root}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tasks/s" not in run.stderr and "collect    [" not in run.stderr and "\x1b[" not in run.stderr
    assert "cfn run: OK" in run.stdout
