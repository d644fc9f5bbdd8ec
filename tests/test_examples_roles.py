"""examples/roles: three roles with their own handler or command, run as its README says."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "roles"


def run_here(args, bus_root, **extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    env.update(extra_env)
    return subprocess.run(args, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=180)


def cfn():
    exe = Path(sys.executable).with_name("cfn")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cfn_core"]


def readme_block(after: str) -> str:
    """The indented block that follows the first README line containing ``after``."""
    lines = (EXAMPLE / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) + 1
    while not lines[start].strip():
        start += 1
    block = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block) + "\n"


def test_run_py_prints_what_the_readme_shows(bus_root, no_leaks):
    proc = run_here([sys.executable, "run.py"], bus_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == readme_block("with that role's command. The output:")


@pytest.mark.parametrize("plugins", ["", "pool"])
def test_each_part_is_coded_by_a_coder_and_reviewed_by_a_reviewer(bus_root, no_leaks, plugins):
    job = "design the schema write the migration test it write the report"
    proc = run_here([sys.executable, "run.py", *job.split()], bus_root, CFN_PLUGINS=plugins)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"plan     planner-\d{4}: 4 parts", lines[0]), lines[0]  # the pool keeps 3 planners warm
    assert len(lines) == 6
    for i, line in enumerate(lines[1:5]):
        # code-<i>   coder-000N: def <spec>():   reviewer-000M: verdict
        words = line.split()
        assert words[0] == f"code-{i}" and words[1].startswith("coder-") and words[2] == "def", line
        assert words[-2].startswith("reviewer-") and words[-1] in ("approve", "revise"), line
    assert "the_report" in lines[4] and lines[4].endswith("revise")  # coder.sh leaves a TODO in it
    assert lines[-1] == "3/4 approved, 0 task(s) failed"


def test_cfn_run_gives_every_role_its_tasks(bus_root, no_leaks):
    proc = run_here(cfn() + ["run", "--json", "--results"], bus_root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["agents"] == 7
    agents = sorted(r["agent"] for r in out["rounds"][0]["results"].values())
    assert agents == ["coder-0001", "coder-0002", "coder-0003", "coder-0004", "planner-0001", "reviewer-0001", "reviewer-0002"]
    # the README's command, verbatim
    line = readme_block("role (the tasks").strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env.update(CFN_BUS_ROOT=str(bus_root), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(line, shell=True, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "True 7", proc.stdout + proc.stderr


def test_agents_flag_is_refused_and_a_count_is_changed_instead(bus_root, no_leaks):
    proc = run_here(cfn() + ["run", "--agents", "3"], bus_root)
    assert proc.returncode == 2 and "change a count" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_here(cfn() + ["run", "--json", "--set", "agents.coder.count=6"], bus_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["agents"] == 9
