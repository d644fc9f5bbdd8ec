"""Task graphs: ``after=`` in Python, ``[[tasks]]`` workflows that ``cfn run`` executes, ``cfn cancel``.

The workflows run as real ``cfn run`` subprocesses on a private bus root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfn_core import Cancelled, ConfigError, Coordinator, TaskFailed
from cfn_core.config import load_config
from cfn_core.testing import wait_for

HERE = Path(__file__).resolve().parent
CFN = [os.path.join(os.path.dirname(sys.executable), "cfn")]


def _config(make_config, plugins=("pool",), agents=2, **workload):
    tables = {"workload": {"agents": agents, "directory": str(HERE), "handler": "feed_handlers:step_agent", **workload}}
    if "pool" in plugins:
        tables["pool"] = {"size": agents}
    return make_config(plugins=plugins, **tables)


def test_after_hands_the_results_of_what_a_task_waits_for(make_config, no_leaks):
    with Coordinator(_config(make_config)) as coord:
        plan = coord.submit("plan", id="plan")
        parts = [coord.submit(i, after=[plan], id=f"part-{i}") for i in range(3)]
        total = coord.submit("sum", after=parts)
        assert parts[0].result(60) == {"payload": 0, "after": {"plan": "plan"}}
        got = total.result(60)
        assert got["payload"] == "sum"
        assert got["after"] == {f"part-{i}": {"payload": i, "after": {"plan": "plan"}} for i in range(3)}
        # a task submitted after its dependency finished still gets the result
        late = coord.submit("late", after=[plan])
        assert late.result(60) == {"payload": "late", "after": {"plan": "plan"}}


def test_a_failed_dependency_skips_its_dependants_with_a_reason(make_config, no_leaks):
    with Coordinator(_config(make_config)) as coord:
        bad = coord.submit("boom", id="bad")
        child = coord.submit("child", after=[bad], id="child")
        grandchild = coord.submit("grandchild", after=[child], id="grandchild")
        unrelated = coord.submit("fine")
        with pytest.raises(TaskFailed, match="boom was asked for"):
            bad.result(60)
        with pytest.raises(TaskFailed, match="task bad it needs failed: .*boom") as info:
            child.result(60)
        assert info.value.skipped
        with pytest.raises(TaskFailed, match="task child it needs was skipped"):
            grandchild.result(60)
        assert unrelated.result(60) == "fine"
    (r,) = coord.feed_rounds
    assert (r.failed, r.skipped, r.cancelled) == (1, 2, 0)


def test_cancelling_a_dependency_skips_what_waits_for_it(make_config, no_leaks, tmp_path):
    marker = tmp_path / "running"
    with Coordinator(_config(make_config)) as coord:
        first = coord.submit({"wait": str(marker)}, id="first")
        then = coord.submit("then", after=[first], id="then")
        wait_for(marker.exists, "the first task to run")
        assert coord.cancel("first")
        with pytest.raises(Cancelled):
            first.result(60)
        with pytest.raises(TaskFailed, match="task first it needs was cancelled"):
            then.result(60)


def _write(path: Path, body: str, bus_root) -> Path:
    path.write_text(body + f'\n[bus]\nroot = "{bus_root}"\n')
    return path


WORKFLOW = """
plugins = ["pool"]
[workload]
agents = 2
handler = "feed_handlers:step_agent"
directory = "{here}"
[pool]
size = 2

[[tasks]]
id = "split"
payload = "split"

[[tasks]]
id = "left"
payload = {{ side = "left" }}
needs = ["split"]

[[tasks]]
id = "right"
payload = {{ side = "right" }}
needs = ["split"]

[[tasks]]
id = "join"
payload = "join"
needs = ["left", "right"]
"""


def _run(args, cwd, timeout=120):
    return subprocess.run(CFN + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cfn_run_executes_a_tasks_workflow_in_dependency_order(bus_root, tmp_path, no_leaks):
    config = _write(tmp_path / "cfn.toml", WORKFLOW.format(here=HERE), bus_root)
    proc = _run(["run", "--config", str(config), "--json", "--results"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["tasks"] == 4 and out["failed"] == 0 and out["skipped"] == 0
    results = out["rounds"][0]["results"]
    assert results["split"]["value"] == "split"
    assert results["left"]["value"] == {"payload": {"side": "left"}, "after": {"split": "split"}}
    assert results["join"]["value"]["after"] == {
        "left": {"payload": {"side": "left"}, "after": {"split": "split"}},
        "right": {"payload": {"side": "right"}, "after": {"split": "split"}},
    }


def test_a_failed_workflow_step_skips_its_dependants_and_the_summary_says_so(bus_root, tmp_path, no_leaks):
    body = WORKFLOW.format(here=HERE).replace('payload = "split"', 'payload = "boom"')
    config = _write(tmp_path / "cfn.toml", body, bus_root)
    proc = _run(["run", "--config", str(config)], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "failed 1  skipped 3 (a task they need failed)" in proc.stdout
    assert "task split it needs failed" in proc.stdout


@pytest.mark.parametrize(
    "tasks, message",
    [
        ('[[tasks]]\nid = "a"\nneeds = ["b"]\n[[tasks]]\nid = "b"\nneeds = ["a"]\n', "needs form a cycle: a -> b -> a"),
        ('[[tasks]]\nid = "a"\nneeds = ["nope"]\n', "id = 'a': needs = ['nope'] names 'nope', which is no task's id"),
        ('[[tasks]]\nid = "a"\n[[tasks]]\nid = "a"\n', "id = 'a': the id is used twice"),
        ('[[tasks]]\nid = "a"\nrole = "chef"\n', "role = 'chef': unknown role"),
        ('[[tasks]]\npayload = 1\n', "[[tasks]] #1: id = None: every task needs an id"),
        ('[[tasks]]\nid = "a"\nneeds = "b"\n', "needs = 'b': a list of task ids"),
    ],
    ids=["cycle", "unknown-id", "duplicate", "unknown-role", "no-id", "needs-not-a-list"],
)
def test_a_bad_workflow_is_a_config_error_naming_it(bus_root, tmp_path, tasks, message):
    config = _write(tmp_path / "cfn.toml", "[workload]\nagents = 1\n" + tasks, bus_root)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(config) in str(info.value) and message in str(info.value)
    proc = _run(["run", "--config", str(config)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("cfn: error: ") and message in proc.stderr


def test_cfn_cancel_stops_a_running_workflow_task(bus_root, tmp_path, no_leaks):
    marker = tmp_path / "running"
    body = WORKFLOW.format(here=HERE).replace('payload = "split"', f'payload = {{ wait = "{marker}" }}')
    config = _write(tmp_path / "cfn.toml", body, bus_root)
    run = subprocess.Popen(CFN + ["run", "--config", str(config), "--json", "--results"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, "the split task to run")
        (run_dir,) = [p.name for p in bus_root.iterdir()]
        unknown = _run(["cancel", run_dir, "no-such-task", "--root", str(bus_root)], tmp_path)
        assert unknown.returncode == 2 and f"run {run_dir} has no task 'no-such-task'" in unknown.stderr
        cancel = _run(["cancel", run_dir, "split", "--root", str(bus_root)], tmp_path)
        assert cancel.returncode == 0, cancel.stderr
        assert f"cancelled task split of run {run_dir}" in cancel.stderr
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err  # cancelled, not failed; the skipped ones follow from it
    doc = json.loads(out)
    assert (doc["failed"], doc["cancelled"], doc["skipped"]) == (0, 1, 3)
    assert doc["rounds"][0]["results"]["split"]["cancelled"] is True
    assert not list(bus_root.iterdir())


def test_concurrent_cfn_cancels_each_get_their_answer(make_config, no_leaks, tmp_path):
    config = _config(make_config, agents=4, handler="feed_handlers:cooperative")
    with Coordinator(config) as coord:
        started = [tmp_path / f"started-{i}" for i in range(4)]
        futures = [coord.submit({"started": str(m)}, id=f"job-{i}") for i, m in enumerate(started)]
        wait_for(lambda: all(m.exists() for m in started), "the four tasks to run")
        run_dir = coord.ctx.bus.run_ref
        cancels = [subprocess.Popen(CFN + ["cancel", run_dir, f.task_id, "--wait", "120"], cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True) for f in futures]
        answers = [(c.wait(timeout=150), c.stderr.read()) for c in cancels]
        for c in cancels:
            c.stderr.close()
        assert [rc for rc, _ in answers] == [0, 0, 0, 0], answers  # none overwrote another's request
        for f in futures:
            with pytest.raises(Cancelled):
                f.result(60)
        assert not os.listdir(os.path.join(run_dir, "state", "cancel"))  # every request answered and removed


def test_a_cancel_pending_when_the_run_ends_is_answered(make_config, no_leaks, tmp_path, monkeypatch):
    from cfn_core import feed

    config = _config(make_config, agents=1)
    with Coordinator(config) as coord:
        assert coord.submit("done", id="done").result(60) == "done"
        monkeypatch.setattr(feed, "REQUEST_SECONDS", 3600.0)  # from now on only the end answers
        run_dir = coord.ctx.bus.run_ref
        requests = Path(run_dir) / "state" / "cancel"
        wait_for(lambda: coord._feed._next_request_check - time.monotonic() > 60, "the next check to be an hour away")
        cancel = subprocess.Popen(CFN + ["cancel", run_dir, "done", "--wait", "120"], cwd=tmp_path,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: requests.is_dir() and any(n.endswith(".request") for n in os.listdir(requests)), "the request")
    _, err = cancel.communicate(timeout=150)
    assert cancel.returncode == 1 and "task done of run" in err and "had already finished" in err, err
    assert not os.path.exists(run_dir)


def test_what_else_is_in_the_cancel_directory_is_removed_unread(make_config, no_leaks, tmp_path):
    config = _config(make_config, agents=1)
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    with Coordinator(config) as coord:
        assert coord.submit(1).result(60) == 1
        requests = Path(coord.ctx.bus.run_ref) / "state" / "cancel"
        requests.mkdir(mode=0o700)
        os.symlink(outside, requests / "link.request")
        os.mkfifo(requests / "fifo.request")
        garbage = requests / "garbage.request"
        garbage.write_bytes(b"\xff not json\n")
        fd = os.open(garbage, os.O_RDONLY)
        try:
            wait_for(lambda: not os.listdir(requests), "the feed to remove every entry")
            assert os.pread(fd, 4096, 0) == b'\xff not json\n\n{"outcome": "invalid"}\n'  # appended
        finally:
            os.close(fd)
        assert coord.submit(2).result(60) == 2  # the feed went on
    assert outside.read_text() == "untouched"


def test_cfn_cancel_names_a_run_that_does_not_exist(bus_root, tmp_path):
    proc = _run(["cancel", "cfn-nosuchrun", "t000001", "--root", str(bus_root)], tmp_path)
    assert proc.returncode == 2 and "no live run 'cfn-nosuchrun'" in proc.stderr and "Traceback" not in proc.stderr


def test_cfn_stop_ends_a_running_workflow_cleanly(bus_root, tmp_path, no_leaks):
    marker = tmp_path / "running"
    body = WORKFLOW.format(here=HERE).replace('payload = "split"', f'payload = {{ wait = "{marker}" }}')
    config = _write(tmp_path / "cfn.toml", body, bus_root)
    run = subprocess.Popen(CFN + ["run", "--config", str(config)], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, "the split task to run")
        agent = int(marker.read_text())
        (run_dir,) = [p.name for p in bus_root.iterdir()]
        stop = _run(["stop", run_dir, "--root", str(bus_root)], tmp_path)
        assert stop.returncode == 0, stop.stderr
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 143, err
    assert "stopped by `cfn stop`" in err and "INTERRUPTED" in out
    wait_for(lambda: not os.path.exists(f"/proc/{agent}"), "the agent to be gone")
    assert not list(bus_root.iterdir())


def test_a_failure_at_the_head_of_a_long_chain_skips_it_all(make_config, no_leaks):
    with Coordinator(_config(make_config, agents=1)) as coord:
        head = coord.submit("boom", id="head")
        chain = [head]
        for i in range(3000):  # deeper than the recursion limit: released in a loop
            chain.append(coord.submit(i, after=[chain[-1]]))
        with pytest.raises(TaskFailed, match="was skipped"):
            chain[-1].result(120)
        assert coord.submit("still serving").result(60) == "still serving"
    (r,) = coord.feed_rounds
    assert (r.failed, r.skipped) == (1, 3000)
