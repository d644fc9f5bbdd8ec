"""cfn-llm: cost and tokens from claude -p JSON documents, cfn_usage lines and agent.usage; budgets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cfn_core import Coordinator

HERE = Path(__file__).resolve().parent
FAKE = HERE / "llm_fake_cli.py"
SAMPLE = json.loads((HERE / "data" / "claude_result.json").read_text())


@pytest.fixture
def handlers_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(HERE))


def test_the_sample_is_a_claude_result_document():
    from cfn_llm import claude_usage

    figures, session = claude_usage(json.dumps(SAMPLE))
    assert figures == {"cost_usd": 0.0123, "tokens_in": 1204, "tokens_out": 187, "turns": 2}
    assert session == SAMPLE["session_id"]
    # stream-json: the last line is the result document
    stream = "\n".join([json.dumps({"type": "system", "subtype": "init"}), json.dumps({"type": "assistant"}), json.dumps(SAMPLE)])
    assert claude_usage(stream)[0] == figures


def test_cost_of_claude_json_results_per_task_role_and_run(make_config, tmp_path, no_leaks):
    log = tmp_path / "log"
    log.mkdir()
    prom = tmp_path / "cfn.prom"
    config = make_config(
        plugins=("llm",), workload={"agents": 4, "command": f"{sys.executable} {FAKE} json {log}"},
        run={"metrics_file": str(prom)},
    )
    with Coordinator(config) as coord:
        result = coord.run([str(n) for n in range(1, 11)])
    assert result.ok
    f = result.plugin_figures["llm"]
    # the summary's cost is the sum of the documents the fake printed: 0.01 * (1 + ... + 10)
    assert f["cost_usd"] == pytest.approx(0.55) and f["tokens_in"] == 5500 and f["tokens_out"] == 550
    assert f["turns"] == 20 and f["reports"] == 10
    assert f["worker.cost_usd"] == pytest.approx(0.55)
    assert sum(a["cost_usd"] for a in f["by_agent"].values()) == pytest.approx(0.55)
    tasks = f["by_task"]
    assert len(tasks) == 10 and all(t["session_id"] == f"session-{k}" for k, t in tasks.items())
    text = prom.read_text()
    import re

    # summed in arrival order: 0.55 give or take the last bit of a float
    assert float(re.search(r"^cfn_llm_cost_usd_total (\S+)$", text, re.M).group(1)) == pytest.approx(0.55)
    assert 'cfn_llm_tokens_total{direction="in"} 5500.0' in text and 'cfn_llm_tokens_total{direction="out"} 550.0' in text


def test_cfn_usage_stderr_lines_and_agent_usage(make_config, tmp_path, no_leaks, handlers_on_path):
    log = tmp_path / "log"
    log.mkdir()
    config = make_config(plugins=("llm",), workload={"agents": 2, "command": f"{sys.executable} {FAKE} usage {log}"})
    with Coordinator(config) as coord:
        result = coord.run(["a", "b", "c"])
    f = result.plugin_figures["llm"]
    assert f["cost_usd"] == pytest.approx(1.5) and f["tokens_in"] == 21 and f["tokens_out"] == 9
    config = make_config(plugins=("llm",), workload={"agents": 2, "handler": "llm_handlers:rate_limited_once"})
    with Coordinator(config) as coord:
        result = coord.run([{"dir": str(tmp_path), "n": i} for i in range(4)])
    f = result.plugin_figures["llm"]
    assert result.ok and f["cost_usd"] == pytest.approx(2.0) and f["tokens_in"] == 404 and f["turns"] == 4


def test_budget_stops_starting_tasks_within_one_task(make_config, tmp_path, no_leaks):
    log = tmp_path / "log"
    log.mkdir()
    config = make_config(
        plugins=("llm", "limits"),
        workload={"agents": 3, "command": f"{sys.executable} {FAKE} json {log}"},
        limits={"budget_usd": 0.035, "max_concurrent": 1},
    )
    with Coordinator(config) as coord:
        result = coord.run(["1"] * 10)
    done = [r for r in result.results.values() if r.ok]
    skipped = [r for r in result.results.values() if not r.ok]
    assert len(done) == 4  # 0.04 >= 0.035 after the 4th: one task past the budget at most (one in flight)
    assert len(skipped) == 6 and all(r.error.startswith("not started: budget ($0.0400 of budget_usd = 0.035 spent)") for r in skipped)
    assert all(r.attempts == 0 for r in skipped)
    assert result.exit_code == 4 and result.not_started == 6
    assert result.plugin_figures["llm"]["cost_usd"] == pytest.approx(0.04)
    assert len((log / "calls").read_text().splitlines()) == 4


def test_the_shell_agents_example_counts_cost_under_its_limits(bus_root, no_leaks):
    import subprocess

    example = HERE.parent / "examples" / "shell-agents"
    exe = Path(sys.executable).with_name("cfn")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfn_core"]
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    proc = subprocess.run(cmd + ["run", "--agents", "4", "--json"], cwd=example, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plugin_figures"]["llm"]["cost_usd"] == pytest.approx(0.004)  # 4 answers of 0.001
    assert out["plugin_figures"]["limits"]["max_in_flight"] <= 2
