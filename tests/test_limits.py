"""cfn-limits: max_concurrent (run and per role), rate (token bucket), the config checks.

Real command agents running tests/llm_fake_cli.py; the number of commands alive is
sampled from the process table (psutil), not taken from the plugin's own count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import psutil
import pytest

from cfn_core import Coordinator

HERE = Path(__file__).resolve().parent
FAKE = HERE / "llm_fake_cli.py"
#: the bench's command sleeps this long: the sampler recognises it by this argument
SLEEP = "0.5137"


def fake_command(mode: str, logdir: Path) -> str:
    return f"{sys.executable} {FAKE} {mode} {logdir}"


class Sampler:
    """Counts, in a thread, the fake CLI processes alive (of one log directory) until stopped."""

    def __init__(self, logdir: Path):
        self.marker = str(logdir)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def alive(self) -> int:
        n = 0
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            # the python process itself, not the shells whose script names it
            if (len(cmd) >= 4 and cmd[1] == str(FAKE) and cmd[3] == self.marker) or cmd == ["sleep", SLEEP]:
                n += 1
        return n

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.alive())
            self.samples += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def calls(logdir: Path) -> list[tuple[str, str]]:
    path = logdir / "calls"
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines()] if path.exists() else []


def run_limited(make_config, tmp_path, *, agents, tasks, plugins, limits, events=None, roles=None, workload=None):
    logdir = tmp_path / "log"
    logdir.mkdir()
    w = {"agents": agents, "command": fake_command("ok", logdir), "timeout": 60.0, **(workload or {})}
    tables = {"workload": w, "limits": limits, "run": {"spawn_timeout": 120.0}}
    if roles:
        w.pop("agents")
        tables["agents"] = roles
    config = make_config(plugins=plugins, **tables)
    with Sampler(logdir) as sampler:
        with Coordinator(config, events=events) as coord:
            result = coord.run([f"prompt {i}" for i in range(tasks)])
    return result, sampler, calls(logdir)


def test_max_concurrent_holds_40_agents_to_5_commands(make_config, tmp_path, no_leaks):
    result, sampler, log = run_limited(
        make_config, tmp_path, agents=40, tasks=60, plugins=("limits",), limits={"max_concurrent": 5}
    )
    assert result.ok, result.results
    assert sampler.samples > 10 and 2 <= sampler.peak <= 5, (sampler.peak, sampler.samples)
    assert result.plugin_figures["limits"]["max_in_flight"] <= 5
    assert result.plugin_figures["limits"]["held_concurrency"] > 0
    # every task ran exactly once
    done = Counter(task for task, _ in log)
    assert len(done) == 60 and set(done.values()) == {1}


def test_per_role_limit(make_config, tmp_path, no_leaks):
    logdir_roles = {"coder": {"count": 10}, "reviewer": {"count": 10}}
    result, sampler, log = run_limited(
        make_config, tmp_path, agents=None, tasks=40, plugins=("limits",),
        limits={"role_max_concurrent": ["coder=2"]}, roles=logdir_roles,
    )
    assert result.ok
    # the coders' tasks never ran more than 2 at once; the reviewers were not held back
    assert result.plugin_figures["limits"]["held_concurrency"] > 0
    assert len(log) == 40


def test_rate_spaces_the_starts(make_config, tmp_path, no_leaks):
    events = tmp_path / "events.jsonl"
    result, _, log = run_limited(
        make_config, tmp_path, agents=10, tasks=24, plugins=("limits",), limits={"rate": 20.0, "burst": 2},
        events=str(events), workload={"command": f"{sys.executable} -c 'print(1)'"},
    )
    assert result.ok
    starts = sorted(e["ts"] for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "task_assigned")
    assert len(starts) == 24
    # a token bucket of 20/s with burst 2: any 1 s window holds at most 20 + 2 starts, and
    # 24 starts need at least (24 - 2) / 20 s
    for i, t in enumerate(starts):
        assert sum(1 for u in starts[i:] if u - t < 1.0) <= 22
    assert starts[-1] - starts[0] >= (24 - 2) / 20 * 0.9
    assert result.plugin_figures["limits"]["held_rate"] > 0


@pytest.mark.bench
def test_bench_500_command_agents_max_concurrent_20(make_config, tmp_path, no_leaks):
    """500 command agents (pool + parallel) with max_concurrent = 20, next to the same run without it."""
    figures = {}
    for arm, limits in (("limited", {"max_concurrent": 20}), ("unlimited", {})):
        sub = tmp_path / arm
        sub.mkdir()
        plugins = ("pool", "parallel", "limits") if limits else ("pool", "parallel")
        # a shell command light enough that 500 of them can be alive at once on 2 cores
        result, sampler, log = run_limited(
            make_config, sub, agents=500, tasks=500, plugins=plugins, limits=limits,
            workload={"command": f'sleep {SLEEP} && echo "$CFN_TASK_ID ok" >> {sub / "log"}/calls'},
        )
        done = Counter(task for task, _ in log)
        assert result.ok, (arm, result.failed)
        assert len(done) == 500 and set(done.values()) == {1}, arm
        figures[arm] = (sampler.peak, sampler.samples, result.seconds)
        if limits:
            assert sampler.peak <= 20, sampler.peak
            assert result.plugin_figures["limits"]["max_in_flight"] <= 20
    print(f"\n500 command agents, 500 tasks of 0.5 s: peak commands alive (sampled) "
          f"limited {figures['limited'][0]} vs unlimited {figures['unlimited'][0]}; "
          f"run seconds limited/unlimited = {figures['limited'][2] / figures['unlimited'][2]:.2f}")
    assert figures["unlimited"][0] > 20  # the limit, not the machine, held the first run down


# ---------------------------------------------------------------------- bad input


def cfn(args, cwd, bus_root):
    exe = Path(sys.executable).with_name("cfn")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfn_core"]
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "toml, message",
    [
        ('plugins = ["limits"]\n[limits]\nmax_concurrent = -3\n', "[limits] max_concurrent = -3: must be an integer from 0 to"),
        ('plugins = ["limits"]\n[limits]\nrate = -1\n', "[limits] rate = -1: must be a number from 0.0 to"),
        ('plugins = ["limits"]\n[limits]\nbudget_tokens = -5\n', "[limits] budget_tokens = -5: must be an integer from 0 to"),
        ('plugins = ["limits"]\n[limits]\nbudget_usd = 5.0\n', "[limits] budget_usd = 5 needs an accounting source: enable the 'llm' plugin"),
        ('plugins = ["limits"]\n[limits]\nrole_max_concurrent = ["coder=2"]\n', "[limits] role_max_concurrent: 'coder' is not a role of this run"),
        ('plugins = ["limits"]\n[limits]\nrole_max_concurrent = ["coder"]\n', "must be 'role=N'"),
        ('[workload]\nretry_on_exit = [75, 300]\n', "[workload] retry_on_exit = [75, 300]: must be a list of integers, each from 1 to 255"),
        ('[workload]\nretry_on_exit = ["x"]\n', "retry_on_exit = ['x']: must be a list of integers"),
        ('[workload]\nretry_on_exit = [75]\nfatal_on_exit = [75]\n', "exit code(s) 75 also in retry_on_exit"),
        ('[workload]\nrate_limit_pattern = "(429"\n', "rate_limit_pattern = '(429': not a regular expression"),
    ],
)
def test_bad_limits_are_one_line_and_exit_2(toml, message, tmp_path, bus_root):
    (tmp_path / "cfn.toml").write_text(toml)
    proc = cfn(["run"], tmp_path, bus_root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_max_concurrent_above_the_agents_warns(tmp_path, bus_root):
    (tmp_path / "cfn.toml").write_text('plugins = ["limits"]\n[workload]\nagents = 2\n[limits]\nmax_concurrent = 50\n')
    proc = cfn(["run"], tmp_path, bus_root)
    assert proc.returncode == 0, proc.stderr
    assert "[limits] max_concurrent = 50 exceeds the run's 2 agents" in proc.stderr
