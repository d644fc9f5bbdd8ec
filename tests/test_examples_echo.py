"""examples/echo: the README's commands work as written (real CLI, real agents)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "echo"


def cfn_command() -> list[str]:
    """The installed console script next to this interpreter (what users type), else python -m."""
    script = Path(sys.executable).with_name("cfn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cfn_core"]


def run_here(args, bus_root, **kw):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    return subprocess.run(args, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_cfn_run_in_the_example_directory(bus_root, no_leaks):
    proc = run_here(cfn_command() + ["run", "--json", "--results"], bus_root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["agents"] == 5 and out["messages_delivered"] == out["messages_planned"] == 10
    values = [r["value"] for r in out["rounds"][0]["results"].values()]
    assert {v["echo"] for v in values} == {"x" * 16}
    assert len({v["agent_pid"] for v in values}) == 5  # five real processes


def test_summary_looks_like_the_readme(bus_root, no_leaks):
    proc = run_here(cfn_command() + ["run"], bus_root)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"cfn run: OK  plugins=baseline .*\n  agents 5  tasks 5  messages 10/10 delivered \(100\.00%\)", proc.stdout)


def test_the_readme_python_snippet_runs(bus_root, no_leaks):
    readme = (EXAMPLE / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    proc = run_here([sys.executable, "-c", snippet], bus_root)
    assert proc.returncode == 0, proc.stderr
    assert "r1-t000000 True {'echo': 'first task'" in proc.stdout
    assert len(proc.stdout.splitlines()) == 3


def test_bad_input_from_the_readme_is_one_clear_line(bus_root, no_leaks):
    proc = run_here(cfn_command() + ["run", "--payload-bytes", "2000000"], bus_root)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "max_message_bytes" in proc.stderr
    proc = run_here(cfn_command() + ["run", "--set", "workload.handler=handler:nope"], bus_root)
    assert proc.returncode == 2
    assert "module 'handler' has no function 'nope'" in proc.stderr and "Traceback" not in proc.stderr
