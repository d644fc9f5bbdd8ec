"""Signals to the coordinator: `cfn run` as a real subprocess, real agents, real signals.

* SIGINT / SIGTERM / SIGHUP: clean shutdown, the partial result printed, exit 130 / 143 / 129,
  no run directory and no agent left.
* SIGKILL (nothing can be cleaned up by the coordinator itself): every agent
  dies with it (PR_SET_PDEATHSIG), the run directory is detectably stale,
  `cfn clean` removes it and the next run is unaffected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import HERE, plugin_sets, read_log, set_id  # noqa: E402

from cfn_core.testing import wait_for  # noqa: E402

CFN = [os.path.join(os.path.dirname(sys.executable), "cfn")]
#: Seconds the agents of a SIGKILLed coordinator may take to die.  Their handlers hang for an
#: hour, so only the kernel's PDEATHSIG can end them this soon; the bound is generous (they
#: die in tens of ms when idle) so that a loaded machine's scheduling delay cannot fail it.
ORPHAN_BOUND = 15.0


def _write_config(path, plugins, agents, bus_root, **workload):
    lines = [f"plugins = {json.dumps(list(plugins))}", "[workload]", f"agents = {agents}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in workload.items()]
    lines += ["[bus]", f"root = {json.dumps(str(bus_root))}"]
    lines += ["[run]", "shutdown_timeout = 1.0"]  # a hanging agent is killed after 1 s instead of 5
    if "pool" in plugins:
        lines += ["[pool]", f"size = {agents}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(tmp_path, config, payloads, *extra):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), CFN_TEST_PAYLOADS=payloads)
    return subprocess.Popen(
        CFN + ["run", "--config", str(config), *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )




def _gone(procs) -> bool:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _hang_tasks(scratch, count, hang):
    """The payloads the agents claim one by one (see ``hang_by_claim``); returns the file."""
    payloads = [{"key": f"t{i:03d}", "dir": str(scratch), "hang": i in hang} for i in range(count)]
    path = scratch / "tasks.json"
    path.write_text(json.dumps(payloads))
    return str(path)


@pytest.mark.parametrize("plugins", plugin_sets(), ids=set_id)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])  # SIGHUP: the terminal closed
def test_interrupt_prints_partial_result_and_cleans_up(tmp_path, bus_root, no_leaks, plugins, sig, code):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # 3 agents, 6 tasks; payloads are claimed in order, so the last one (which hangs) starts last
    tasks = 6
    hanging = {5}
    config = _write_config(
        tmp_path / "cfn.toml", plugins, 3, bus_root, handler="test_faults_handlers:hang_by_claim",
        tasks=tasks, timeout=600.0,
    )
    proc = _start(tmp_path, config, _hang_tasks(scratch, tasks, hanging), "--json", "--results")
    try:
        me = psutil.Process(proc.pid)
        wait_for(lambda: sum(1 for w, *_ in read_log(scratch) if w == "start") >= tasks, "every task to start")
        agents = me.children(recursive=True)
        assert agents
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err.decode()[-2000:]
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["exit_code"] == code and doc["ok"] is False
    (round_,) = doc["rounds"]
    assert round_["interrupted"] is True and round_["tasks"] == tasks
    ok = [v for v in round_["results"].values() if v["ok"]]
    # nothing reported done that was not: only the answered payloads, never a hanging one
    assert sorted(v["value"] for v in ok) == sorted(set(v["value"] for v in ok))
    assert {v["value"] for v in ok} <= {f"t{i:03d}" for i in range(tasks) if i not in hanging}
    assert round_["failed"] == tasks - len(ok)
    print(f"\n{set_id(plugins)} {sig!r}: exit {proc.returncode}, {len(ok)} of {tasks} results in the partial result")
    wait_for(lambda: _gone(agents), "the agents to exit", timeout=60)
    assert not list(bus_root.iterdir()), "the run directory was left behind"


@pytest.mark.parametrize("plugins", plugin_sets(), ids=set_id)
def test_coordinator_sigkill_takes_every_agent_down(tmp_path, bus_root, no_leaks, plugins):
    from cfn_core.bus.shm import find_runs

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    agents_n = 4
    payloads = _hang_tasks(scratch, agents_n, set(range(agents_n)))
    config = _write_config(
        tmp_path / "cfn.toml", plugins, agents_n, bus_root, handler="test_faults_handlers:hang_by_claim", timeout=600.0
    )
    proc = _start(tmp_path, config, payloads)
    try:
        me = psutil.Process(proc.pid)
        wait_for(lambda: sum(1 for w, *_ in read_log(scratch) if w == "start") >= agents_n, "every agent to be busy")
        agents = me.children(recursive=True)
        assert len(agents) >= agents_n
    finally:
        proc.kill()
    t0 = time.monotonic()
    proc.communicate(timeout=30)
    wait_for(lambda: _gone(agents), "the orphaned agents to die", timeout=ORPHAN_BOUND)
    elapsed = time.monotonic() - t0
    print(f"\n{set_id(plugins)}: {len(agents)} processes gone {elapsed * 1000:.0f} ms after the coordinator's SIGKILL")
    assert elapsed < ORPHAN_BOUND, f"agents outlived their coordinator by {elapsed:.2f}s"

    # the run directory is still there, and recognisably stale
    runs = find_runs(str(bus_root))
    assert len(runs) == 1 and runs[0][1] is True
    stale_dir = runs[0][0]
    # `cfn clean` removes it (and reports it), a dry run first changes nothing
    dry = subprocess.run(CFN + ["clean", "--root", str(bus_root), "--dry-run"], capture_output=True, text=True)
    assert f"would remove {stale_dir}" in dry.stdout and stale_dir.exists()
    clean = subprocess.run(CFN + ["clean", "--root", str(bus_root)], capture_output=True, text=True)
    assert clean.returncode == 0
    assert f"removed {stale_dir}" in clean.stdout and "1 stale run(s) removed" in clean.stdout
    assert not stale_dir.exists()

    # a new run on the same root is unaffected
    fresh = _write_config(tmp_path / "fresh.toml", plugins, 3, bus_root)
    done = subprocess.run(CFN + ["run", "--config", str(fresh), "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["delivery_rate"] == 1.0
    assert not list(bus_root.iterdir())


def test_clean_keeps_a_live_run(tmp_path, bus_root, no_leaks):
    """`cfn clean` must never remove the run directory of a coordinator that is alive."""
    from cfn_core.bus.shm import ShmBus

    bus = ShmBus.create(str(bus_root))
    try:
        out = subprocess.run(CFN + ["clean", "--root", str(bus_root)], capture_output=True, text=True).stdout
        assert "0 stale run(s) removed, 1 live run(s) kept" in out
        assert bus.run_dir.exists()
    finally:
        bus.destroy()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])  # SIGHUP: the terminal closed
def test_interrupt_during_spawn_leaves_nothing(tmp_path, bus_root, no_leaks, sig, code):
    """The baseline starts agents one at a time: a signal in the middle of that is clean too."""
    config = _write_config(tmp_path / "cfn.toml", (), 40, bus_root)
    proc = _start(tmp_path, config, "", "--json")
    try:
        me = psutil.Process(proc.pid)
        wait_for(lambda: len(me.children(recursive=True)) >= 3, "a few agents to be started")
        agents = me.children(recursive=True)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err.decode()[-2000:]
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["rounds"][0]["tasks"] == 40
    assert "Traceback" not in err.decode()
    wait_for(lambda: _gone(agents), "the agents to exit", timeout=60)
    assert not list(bus_root.iterdir()), "the run directory was left behind"


def _descendants(proc: psutil.Process, keep) -> list[psutil.Process]:
    """``proc``'s descendants for which ``keep(p)`` holds; one that exits while it is looked at
    is left out (the pool's warm-up child and a command's `cat` come and go: CI saw one
    vanish between children() and name())."""
    found = []
    for p in proc.children(recursive=True):
        try:
            if keep(p):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize("plugins", plugin_sets(), ids=set_id)
def test_coordinator_sigkill_takes_running_commands_down_too(tmp_path, bus_root, no_leaks, plugins):
    """A command workload runs in its own session (so a timeout can kill its group); it must
    still die with its agent, and so with a SIGKILLed coordinator."""
    marker = f"cfn-orphan-check-{os.getpid()}-{len(plugins)}"
    config = _write_config(
        tmp_path / "cfn.toml", plugins, 3, bus_root, command=f"cat >/dev/null; sleep 300 # {marker}", timeout=600.0
    )
    proc = _start(tmp_path, config, "")
    try:
        me = psutil.Process(proc.pid)

        def sleepers():
            return _descendants(me, lambda p: p.name() == "sleep")

        wait_for(lambda: len(sleepers()) >= 3, "every command to run")
        everything = me.children(recursive=True)
    finally:
        proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: _gone(everything), "agents and their commands to die", timeout=ORPHAN_BOUND)
    subprocess.run(CFN + ["clean", "--root", str(bus_root)], capture_output=True, check=True)


DEFERRED = r"""
import os, signal, sys, threading
from cfn_core.process import interrupts_deferred

mode = sys.argv[1]
if mode == "raise":
    def on_term(signum, frame):
        raise SystemExit(f"handled {signum}")
    signal.signal(signal.SIGTERM, on_term)
# a second thread: with a signal mask in the main thread only, the kernel would hand the
# signal to this thread and Python would still run the handler in the main thread
idle = threading.Event()
threading.Thread(target=idle.wait, daemon=True).start()
steps = []
try:
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        for i in range(200_000):  # plenty of bytecode boundaries for a pending handler to run at
            pass
        steps.append("block finished")
        print("block finished", flush=True)
    steps.append("after the block")
finally:
    print(steps, flush=True)
"""


@pytest.mark.parametrize("mode", ["raise", "default"])
def test_an_interrupt_inside_a_deferred_block_is_handled_when_it_ends(mode):
    proc = subprocess.run([sys.executable, "-c", DEFERRED, mode], capture_output=True, text=True, timeout=60)
    assert "block finished" in proc.stdout  # the signal did not cut the block
    assert "after the block" not in proc.stdout  # ... and was handled right after it
    if mode == "raise":
        assert proc.returncode == 1 and f"handled {int(signal.SIGTERM)}" in proc.stderr
    else:
        assert proc.returncode == -signal.SIGTERM  # SIG_DFL: the process ends as the signal's default says


def test_a_sighup_the_caller_ignores_stays_ignored(tmp_path, bus_root, no_leaks):
    """`nohup cfn run`: the run goes on when its terminal closes (SIGHUP ignored before exec)."""
    go = tmp_path / "go"
    marker = f"cfn-nohup-{os.getpid()}"
    config = _write_config(
        tmp_path / "cfn.toml", (), 2, bus_root,
        command=f"cat >/dev/null; while [ ! -e {go} ]; do sleep 0.05; done # {marker}", timeout=600.0,
    )
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        CFN + ["run", "--config", str(config)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    try:
        me = psutil.Process(proc.pid)

        def commands_running() -> int:
            return len(_descendants(me, lambda p: marker in " ".join(p.cmdline())))

        wait_for(lambda: commands_running() >= 2, "both commands to run")
        proc.send_signal(signal.SIGHUP)
        go.touch()  # the commands finish: the run ends as if nothing had happened
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"cfn run: OK" in out
