"""examples/workflow: the README's commands work as written (cfn run executes the [[tasks]] graph)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow"
CFN = [str(Path(sys.executable).with_name("cfn"))]


def run_here(args, bus_root, cwd=EXAMPLE):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    return subprocess.run(CFN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cfn_run_executes_the_workflow(bus_root, no_leaks):
    proc = run_here(["run"], bus_root)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"cfn run: OK  plugins=pool .*\n  agents 3  tasks 4  messages 8/8 delivered \(100\.00%\)  failed 0", proc.stdout)


def test_the_total_is_what_the_readme_says(bus_root, no_leaks):
    proc = run_here(["run", "--json", "--results"], bus_root)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["rounds"][0]["results"]
    readme = (EXAMPLE / "README.md").read_text()
    expected = re.search(r"total: `(\{.*\})`", readme).group(1)
    assert repr(results["total"]["value"]).replace("(", "[").replace(")", "]") == expected
    left, right = results["count-left"]["value"], results["count-right"]["value"]
    assert sum(left.values()) + sum(right.values()) == results["total"]["value"]["words"] == 14


def test_a_failing_step_skips_what_needs_it(bus_root, tmp_path, no_leaks):
    body = (EXAMPLE / "cfn.toml").read_text().replace('step = "count", half = 1', 'step = "nope", half = 1')
    (tmp_path / "cfn.toml").write_text(body)
    (tmp_path / "steps.py").write_text((EXAMPLE / "steps.py").read_text())
    proc = run_here(["run"], bus_root, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "failed 1  skipped 1 (a task they need failed)" in proc.stdout
    assert "unknown step 'nope'" in proc.stdout and "task count-right it needs failed" in proc.stdout
