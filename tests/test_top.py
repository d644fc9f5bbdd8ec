"""`cfn top` and `cfn stop` against live runs (real `cfn run` processes), and the snapshot they read."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cfn_core import Coordinator

HERE = os.path.dirname(os.path.abspath(__file__))
#: a table row of one agent: the kernel's ids (agent-0001) or a pool's (pool-00001)
AGENT_ROW = re.compile(r"\b(agent|pool)-\d+")
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "NO_COLOR": "1"}


def wait_for(condition, timeout=120.0, what="condition"):
    """Poll ``condition`` (a file another process writes: nothing to block on) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cfn(*args, cwd, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "cfn_core", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=ENV, **kw
    )


class LiveRun:
    """A `cfn run` of slow tasks in the background: one busy agent per task until stopped."""

    def __init__(self, bus_root: Path, cwd: Path, agents: int, plugins: str = "", extra=()):
        self.bus_root, self.cwd = bus_root, cwd
        self.others = set(bus_root.glob("cfn-*"))  # runs started before this one
        args = [
            "run", "--agents", str(agents), "--handler", "watch_handlers:slow", "--plugins", plugins,
            "--set", f"bus.root={bus_root}", "--set", "run.max_agents=10000", "--set", "workload.timeout=600", *extra,
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cfn_core", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        self.run_dir = wait_for(self._run_dir, what="the run directory")

    def _run_dir(self):
        dirs = [p for p in self.bus_root.glob("cfn-*") if p not in self.others and (p / "owner.json").exists()]
        return dirs[0] if dirs else None

    def snapshot(self):
        try:
            return json.loads((self.run_dir / "state" / "snapshot").read_bytes())
        except (OSError, ValueError):
            return None

    def wait_busy(self, agents: int, timeout=300.0):
        def busy():
            s = self.snapshot()
            return s if s and s["by_state"].get("busy") == agents else None

        return wait_for(busy, timeout, f"{agents} busy agents in the snapshot")

    def finish(self, timeout=300):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@pytest.fixture
def live_run(bus_root, tmp_path, no_leaks):
    runs = []

    def start(agents, **kw):
        run = LiveRun(bus_root, tmp_path, agents, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:  # a failed test must not leave its coordination running
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        for pipe in (run.proc.stdout, run.proc.stderr):
            pipe.close()
    if any(r.proc.returncode == -signal.SIGKILL for r in runs):
        cfn("clean", "--root", str(bus_root), cwd=tmp_path)


def test_top_once_shows_the_agents_and_stop_ends_the_run(live_run, bus_root, tmp_path):
    run = live_run(6)
    snapshot = run.wait_busy(6)
    assert snapshot["by_role"] == {"worker": {"busy": 6}}
    assert {a["task"] for a in snapshot["agents"]} == {f"r1-t{i:06d}" for i in range(6)}
    assert all(a["elapsed"] >= 0 and a["messages_in"] == 1 and a["pid"] for a in snapshot["agents"])
    top = cfn("top", "--once", "--root", str(bus_root), cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    frame = top.stdout
    assert f"run {run.run_dir.name}" in frame and "\x1b[" not in frame  # plain: not a terminal, NO_COLOR
    rows = [line for line in frame.splitlines() if line.startswith("agent-")]
    assert len(rows) == 6 and all(" busy " in row and "r1-t0000" in row for row in rows)
    assert "worker" in frame and "tasks: 0 done, 0 failed, 0 retried, 6 queued" in frame
    # a short stall threshold marks every busy agent (they send nothing while they sleep)
    stalled = cfn("top", "--once", "--stall-seconds", "0", run.run_dir.name[:6], "--root", str(bus_root), cwd=tmp_path)
    assert sum("STALLED" in line for line in stalled.stdout.splitlines()) == 6, stalled.stdout
    stop = cfn("stop", "--root", str(bus_root), cwd=tmp_path)
    assert stop.returncode == 0 and "has stopped" in stop.stderr, stop.stderr
    code, out, err = run.finish()
    assert code == 143 and "stopped by `cfn stop`" in err and "INTERRUPTED" in out
    assert not list(bus_root.iterdir())


def test_top_and_stop_without_a_live_run_say_so(bus_root, tmp_path):
    for command in ("top", "stop"):
        proc = cfn(command, "--root", str(bus_root), cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr == f"cfn {command}: no live run under {bus_root}\n"
    proc = cfn("top", "cfn-nosuch", "--root", str(bus_root), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("cfn: error: cfn top: no live run 'cfn-nosuch'")
    proc = cfn("top", str(bus_root / "cfn-nosuch"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and proc.stderr.count("\n") == 1


def test_with_several_live_runs_one_must_be_named(live_run, bus_root, tmp_path):
    first = live_run(1)
    second = live_run(1)
    first.wait_busy(1)
    second.wait_busy(1)
    names = sorted([first.run_dir.name, second.run_dir.name])
    proc = cfn("top", "--once", "--root", str(bus_root), cwd=tmp_path)
    assert proc.returncode == 2 and "2 live runs" in proc.stderr
    assert all(f"cfn top {name}" in proc.stderr for name in names)
    for name in names:
        proc = cfn("top", "--once", name, "--root", str(bus_root), cwd=tmp_path)
        assert proc.returncode == 0 and f"run {name}" in proc.stdout
        assert cfn("stop", name, "--root", str(bus_root), cwd=tmp_path).returncode == 0
    assert first.finish()[0] == second.finish()[0] == 143


def test_top_attached_to_a_run_whose_coordinator_is_killed_says_so_and_exits_1(live_run, bus_root, tmp_path):
    run = live_run(2)
    run.wait_busy(2)
    before = sorted(str(p.relative_to(run.run_dir)) for p in run.run_dir.rglob("*"))
    top = subprocess.Popen(  # not a terminal: plain frames, one per interval
        [sys.executable, "-m", "cfn_core", "top", "--interval", "0.2", "--root", str(bus_root)],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: top.stdout.readline().startswith("cfn top  run"), what="a first frame")
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait()  # reaped, as its shell would: a zombie still has its /proc entry
    try:
        _out, err = top.communicate(timeout=120)
    finally:
        top.kill()
        top.wait()
    assert top.returncode == 1
    assert f"the coordinator of run {run.run_dir.name} is no longer running: it was killed or crashed" in err
    after = sorted(str(p.relative_to(run.run_dir)) for p in run.run_dir.rglob("*"))
    assert set(after) <= set(before) | {"state/snapshot"}, "cfn top wrote into the run directory"
    clean = cfn("clean", "--root", str(bus_root), cwd=tmp_path)
    assert "1 stale run(s) removed" in clean.stdout


def test_agents_never_load_rich(make_config, no_leaks, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    monkeypatch.syspath_prepend(HERE)
    for plugins in ((), ("pool",)):
        result = Coordinator(make_config(plugins=plugins, workload={"agents": 2, "handler": "watch_handlers:modules"})).run()
        assert result.ok and [r.value for r in result.rounds[0].results.values()] == [[], []], plugins
    assert "rich" not in sys.modules or "cfn_core.top" in sys.modules  # the coordinator does not load it either


def _tmux(socket, *args):
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=60)


def _top_in_tmux(run, bus_root, tmp_path, agents, width=180, height=50):
    """`cfn top` in a real terminal (a tmux pane) against ``run``: the captured screen once it shows agents."""
    socket = f"cfntest-{os.getpid()}-{os.urandom(3).hex()}"
    env = " ".join(f"{k}={v}" for k, v in (("PYTHONPATH", ENV["PYTHONPATH"]), ("TERM", "xterm-256color")))
    command = f"env -u NO_COLOR {env} {sys.executable} -m cfn_core top --interval 0.3 --root {bus_root}; sleep 600"
    started = _tmux(socket, "new-session", "-d", "-x", str(width), "-y", str(height), "-c", str(tmp_path), command)
    assert started.returncode == 0, started.stderr
    try:
        def screen():
            shot = _tmux(socket, "capture-pane", "-p", "-e").stdout
            return shot if AGENT_ROW.search(shot) and "tasks/s" in shot else None

        shot = wait_for(screen, what="cfn top's screen in tmux")
        plain = _tmux(socket, "capture-pane", "-p").stdout
        return shot, plain
    finally:
        _tmux(socket, "kill-server")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_top_in_a_real_terminal_shows_the_agents(live_run, bus_root, tmp_path):
    agents = 30
    run = live_run(agents)
    run.wait_busy(agents)
    shot, plain = _top_in_tmux(run, bus_root, tmp_path, agents)
    rows = [line for line in plain.splitlines() if line.lstrip().startswith("agent-")]
    assert 10 <= len(rows) <= agents and all(" busy " in r for r in rows), plain
    assert "more agents" in plain or len(rows) == agents
    assert "worker" in plain and f"agents {agents}" in plain
    assert "\x1b[" in shot  # a terminal, no NO_COLOR: styled
    assert cfn("stop", "--root", str(bus_root), cwd=tmp_path).returncode == 0
    assert run.finish()[0] == 143


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 500 agents' start, the frame and the stop: each has 600 s of room on a loaded machine
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_top_in_a_real_terminal_against_500_agents(live_run, bus_root, tmp_path):
    run = live_run(500, plugins="pool,parallel")
    run.wait_busy(500, timeout=600)
    _shot, plain = _top_in_tmux(run, bus_root, tmp_path, 500)
    assert "agents 500" in plain and "busy" in plain
    rows = [line for line in plain.splitlines() if AGENT_ROW.match(line.lstrip())]  # pooled: pool-00001...
    assert len(rows) >= 10 and "more agents" in plain
    assert cfn("stop", "--root", str(bus_root), cwd=tmp_path, timeout=600).returncode == 0
    assert run.finish(timeout=600)[0] == 143


def test_top_shows_hosted_agents_with_their_host(live_run, bus_root, tmp_path):
    run = live_run(4, extra=("--set", "workload.host=async", "--set", "workload.hosts=2"))
    snapshot = run.wait_busy(4)
    hosts = {a["id"]: a["host"] for a in snapshot["agents"]}
    assert set(hosts.values()) == {"_host.worker.1", "_host.worker.2"}
    # wide enough for every column (under xdist COLUMNS may say 80, and rich then cuts cells short)
    top = subprocess.run([sys.executable, "-m", "cfn_core", "top", "--once", "--root", str(bus_root)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**ENV, "COLUMNS": "200"})
    assert top.returncode == 0, top.stderr
    header = next(line for line in top.stdout.splitlines() if line.lstrip().startswith("agent "))
    assert header.split()[-1] == "host"
    rows = {line.split()[0]: line.split() for line in top.stdout.splitlines() if line.startswith("agent-")}
    assert len(rows) == 4
    for agent_id, cells in rows.items():
        assert cells[-1] == hosts[agent_id] and " busy " in " ".join(cells)
    assert cfn("stop", "--root", str(bus_root), cwd=tmp_path).returncode == 0
    assert run.finish()[0] == 143
