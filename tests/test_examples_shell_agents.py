"""examples/shell-agents: a shell command per task, with stderr capture and a per-task timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shell-agents"


def run_here(args, bus_root):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    return subprocess.run(args, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=120)


def hanging_fake_llms():
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[:2] == ["sleep", "600"]:
            out.append(p.pid)
    return out


def test_run_py_reports_answers_failures_and_timeouts(bus_root, no_leaks):
    before = set(hanging_fake_llms())
    proc = run_here([sys.executable, "run.py"], bus_root)
    assert proc.returncode == 1, proc.stderr  # two prompts fail, as the README says
    out = proc.stdout
    assert "ok     answer to a 6-word prompt: SUMMARIZE THE PLAN IN ONE LINE" in out
    assert "ok     answer to a 3-word prompt: LIST THREE RISKS" in out
    assert "FAILED command exited with status 3: fake-llm: cannot answer: [fail] a prompt the tool rejects\n" in out
    assert "FAILED command timed out after 2s\n    stderr fake-llm: thinking about '[hang]" in out
    assert "8/8 messages delivered, 2 task(s) failed" in out
    # the timeout killed the command's whole process group: no `sleep 600` survives it
    assert set(hanging_fake_llms()) <= before


def test_all_good_prompts_exit_zero(bus_root, no_leaks):
    proc = run_here([sys.executable, "run.py", "one prompt", "two prompts here"], bus_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer to a 3-word prompt: TWO PROMPTS HERE" in proc.stdout


def test_cfn_run_uses_the_command(bus_root, no_leaks):
    cfn = Path(sys.executable).with_name("cfn")
    cmd = [str(cfn)] if cfn.exists() else [sys.executable, "-m", "cfn_core"]
    proc = run_here(cmd + ["run", "--agents", "3", "--json", "--results"], bus_root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    values = {r["value"] for r in out["rounds"][0]["results"].values()}
    assert values == {"answer to a 1-word prompt: " + "X" * 24 + "\n"}
