"""Clean lifecycle: nothing left after a run (processes, run directory, fds), agents die with
their parent, and the open-file limit is raised or refused clearly.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cfn_core import COORDINATOR_ID, Coordinator, PluginError, hookimpl
from cfn_core.bus.shm import ShmBus
from cfn_core.messages import decode


def test_nothing_is_left_after_runs(make_config, bus_root, no_leaks):
    config = make_config(workload={"agents": 3, "rounds": 2, "topology": "mesh", "messages_per_agent": 2})
    for _ in range(2):
        with Coordinator(config) as coord:
            run_dir = coord.ctx.bus.run_dir
            assert run_dir.parent == bus_root and run_dir.is_dir()
            assert coord.run().ok
            assert coord.run(["again"]).ok
        assert not run_dir.exists()
    assert list(bus_root.iterdir()) == []


def test_close_without_run_and_twice(make_config, bus_root, no_leaks):
    coord = Coordinator(make_config(workload={"agents": 1}))
    coord.open()
    coord.open()  # idempotent
    coord.close()
    coord.close()
    assert list(bus_root.iterdir()) == []


class BreaksOnSecondAgent:
    name = "breaks-on-second"

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        if agent.id == "agent-0002":
            raise RuntimeError("observer crashed")


def test_an_error_mid_spawn_still_stops_every_agent(make_config, bus_root, no_leaks):
    # strict: a plugin failure is fatal (without it the run falls back and completes)
    config = make_config(workload={"agents": 4}, run={"strict": True})
    with pytest.raises(PluginError, match="plugin 'breaks-on-second' failed in cfn_spawn .*observer crashed"):
        with Coordinator(config, extra_plugins=[BreaksOnSecondAgent()]) as coord:
            coord.run()
    assert coord.ctx is None
    assert list(bus_root.iterdir()) == []


def test_an_error_mid_round_still_stops_every_agent(make_config, bus_root, no_leaks):
    config = make_config(workload={"agents": 3}, bus={"max_message_bytes": 2048})
    with Coordinator(config) as coord:
        with pytest.raises(Exception, match="max_message_bytes"):
            coord.run(["ok", "ok", "z" * 5000])  # the third task cannot be sent
        assert all(not h.alive or h.state == "ready" for h in coord.ctx.agents.values())
    assert list(bus_root.iterdir()) == []


PARENT = textwrap.dedent(
    """
    import os, subprocess, sys
    run = sys.argv[1]
    agent = subprocess.Popen([sys.executable, "-m", "cfn_core.agent", "--run", run, "--id", "orphan-1",
                              "--parent", str(os.getpid())])
    print(agent.pid, flush=True)
    sys.stdin.read()  # until the test kills us
    """
)


def test_agent_dies_with_its_parent(make_config, bus_root, no_leaks):
    config = make_config(workload={"agents": 1})
    bus = ShmBus.create(str(bus_root))
    try:
        bus.put_state("config", json.dumps({"config": config.to_dict(), "plugin_modules": {}}).encode())
        bus.listen(COORDINATOR_ID)
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(bus.run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        agent_pid = int(parent.stdout.readline())
        pidfd = os.pidfd_open(agent_pid)
        try:
            # the agent says ready only after it asked for PR_SET_PDEATHSIG
            ready = []
            deadline = time.monotonic() + 60
            while not ready and time.monotonic() < deadline:
                ready = [decode(r) for r, _ in bus.read(COORDINATOR_ID, f"inbox/{COORDINATOR_ID}")]
                if not ready:
                    bus.wait(COORDINATOR_ID, 1.0)
            assert [m.kind for m in ready] == ["ready"] and ready[0].body["pid"] == agent_pid
            readable, _, _ = select.select([pidfd], [], [], 0)
            assert not readable  # alive while its parent is
            parent.kill()
            parent.wait()
            parent.stdin.close()
            parent.stdout.close()
            readable, _, _ = select.select([pidfd], [], [], 30)
            assert readable, "the agent outlived its parent"
        finally:
            os.close(pidfd)
    finally:
        bus.destroy()


def test_agent_whose_parent_is_already_gone_exits_at_once(bus_root):
    # --parent names a process that is not our parent: the parent died before prctl could watch it
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core.agent", "--run", str(bus_root / "cfn-gone"), "--id", "a1", "--parent", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == ""


# ---------------------------------------------------------------------- RLIMIT_NOFILE

LIMITS = textwrap.dedent(
    """
    import resource, sys
    from cfn_core.process import ensure_fd_limit
    from cfn_core.errors import ResourceLimitError
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        got = ensure_fd_limit(int(sys.argv[3]), "500 agents")
    except ResourceLimitError as exc:
        print("error", exc)
    else:
        print("ok", got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """
)


def limits(soft, hard, needed):
    out = subprocess.run([sys.executable, "-c", LIMITS, str(soft), str(hard), str(needed)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_fd_limit_is_raised_when_needed():
    assert limits(300, 4096, 1000) == "ok 1000 1000"


def test_fd_limit_is_left_alone_when_enough():
    assert limits(2048, 4096, 1000) == "ok 2048 2048"


def test_fd_limit_too_low_is_a_clear_error():
    out = limits(256, 512, 1756)
    assert out == (
        "error 500 agents needs about 1756 open files but this process may only open 512 (RLIMIT_NOFILE hard limit); "
        "raise it (ulimit -Hn, /etc/security/limits.conf) or use fewer agents"
    )


def _low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))


def test_cfn_run_refuses_before_starting_anything_when_the_hard_limit_is_too_low(tmp_path, bus_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core", "run", "--agents", "300"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_low_limit,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "cfn: error: 300 agents needs about 1156 open files but this process may only open 256 "
        "(RLIMIT_NOFILE hard limit); raise it (ulimit -Hn, /etc/security/limits.conf) or use fewer agents"
    )
    assert list(bus_root.iterdir()) == []


def test_cfn_run_raises_a_low_soft_limit(tmp_path, bus_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)

    def low_soft():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core", "run", "--agents", "3", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=low_soft,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_sigterm_handler_is_restored_after_cfn_run(tmp_path, bus_root, monkeypatch):
    from cfn_core import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CFN_BUS_ROOT", str(bus_root))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["run", "--agents", "1", "--json"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_without_a_with_block_cleans_up_after_itself(make_config, bus_root, no_leaks):
    coord = Coordinator(make_config(workload={"agents": 2}))
    result = coord.run(["a", "b"])
    assert result.ok and sorted(r.value for r in result.results.values()) == ["a", "b"]
    assert coord.ctx is None
    assert list(bus_root.iterdir()) == []
    assert coord.run(["c"]).ok  # and it can run again
    assert list(bus_root.iterdir()) == []
