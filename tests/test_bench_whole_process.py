"""The whole-process comparison and the fork floor row: they run and check every echo (no timing is asserted)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import cfn_core.bench.whole_process as whole_process_module
from cfn_core.bench.references import fork_floor
from cfn_core.bench.whole_process import ARMS, check_output


def whole_process(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "cfn_core.bench.whole_process", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


#: the bytecode of one cfn module, which the benchmark compiles before its first arm
PYC = importlib.util.cache_from_source(whole_process_module.__file__)


def test_smoke_every_arm_completes_with_every_echo(tmp_path, bus_root, no_leaks):
    out = tmp_path / "whole.json"
    if os.path.exists(PYC):
        os.unlink(PYC)  # (this module is imported already: nothing reads it meanwhile)
    # no process writes bytecode of its own accord: only the benchmark's compile step does
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = whole_process("--agents", "2", "--repeat", "1", "--json", str(out), "--set", f"bus.root={bus_root}", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("whole process, cold, 1 alternating repetition(s)")
    assert lines[1].startswith("load average (1/5/15 min): ") and "at the end" in lines[1]
    # cfn's modules were byte-compiled first, as a pip install does (the stdlib arms' are)
    assert lines[2].startswith("cfn's bytecode: compiled first (packages per interpreter: {'cfn': ")
    assert lines[4].split() == ["N", "arm", "median", "min", "vs", "floor", "vs", "best", "stdlib", "CPU", "completed"]
    rows = [line for line in lines[5:] if line.split()[:1] == ["2"]]
    assert len(rows) == len(ARMS) and all(row.endswith("1/1") for row in rows), proc.stdout
    assert "FAILED" not in proc.stdout

    result = json.loads(out.read_text())
    assert result["format"] == "cfn-whole-process/1"
    assert os.path.exists(PYC), "cfn's modules were not byte-compiled before the arms ran"
    assert len(result["machine"]["load_average"]) == len(result["machine"]["load_average_end"]) == 3
    assert sorted(r["arm"] for r in result["runs"]) == sorted(ARMS)
    for run in result["runs"]:
        assert run["ok"] and run["echoed"] == 2 and run["error"] is None and run["seconds"] > 0, run
    summary = {r["arm"]: r for r in result["summary"]}
    assert summary["floor"]["vs_floor"] == 1.0
    assert min(summary[a]["vs_best_stdlib"] for a in ("processpool", "mp-pipes")) == 1.0
    assert all(summary[a]["vs_floor"] > 0 and summary[a]["vs_best_stdlib"] > 0 for a in ARMS)
    for arm in ("cfn", "cfn-hosted"):
        assert set(summary[arm]["cfn_medians"]) == {"open_seconds", "seconds", "close_seconds", "total_seconds"}
    hosted = next(r for r in result["runs"] if r["arm"] == "cfn-hosted")
    assert "workload.host=async" in whole_process_module.arm_command("cfn-hosted", 2, 4, "pool,parallel", [])
    assert hosted["cfn"]["open_seconds"] is not None
    assert all(run["cpu_seconds"] > 0 for run in result["runs"])  # the arm's whole tree, reaped


def test_another_interpreter_runs_the_cfn_arm_side_by_side(tmp_path, bus_root, no_leaks):
    """--cfn-python LABEL=PYTHON: a second cfn arm (another checkout's venv), alternated with the rest."""
    out = tmp_path / "whole.json"
    proc = whole_process("--agents", "2", "--repeat", "2", "--json", str(out), "--set", f"bus.root={bus_root}",
                         "--cfn-python", f"other={sys.executable}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["arms"] == ["cfn", "cfn@other", "cfn-hosted", "processpool", "mp-pipes", "floor"]
    assert [r["arm"] for r in result["runs"] if r["repetition"] == 2][:2] == ["cfn@other", "cfn-hosted"]  # rotated
    other = next(r for r in result["summary"] if r["arm"] == "cfn@other")
    assert other["completed"] == 2 and other["label"].endswith("[other]") and other["vs_floor"] > 0
    assert "cfn@other at 2, inside the run" in proc.stdout


def test_a_missing_echo_or_a_plugin_fallback_fails_the_arm():
    assert check_output("floor", 3, 4, 0, '{"agents": 3, "echoed": 2}\n', "")["error"] == "2 of 3 echoes came back"
    assert not check_output("mp-pipes", 3, 4, 1, "", "Traceback ...")["ok"]
    cfn = {"ok": True, "fallbacks": [], "rounds": [{"results": {"a": {"value": "xxxx"}, "b": {"value": "xxx"}}}]}
    assert check_output("cfn", 2, 4, 0, json.dumps(cfn), "")["error"] == "1 of 2 echoes came back"
    cfn["rounds"][0]["results"]["b"]["value"] = "xxxx"
    assert check_output("cfn", 2, 4, 0, json.dumps(cfn), "")["ok"]
    cfn["fallbacks"] = [{"plugin": "pool", "count": 1}]
    assert "plugin fallbacks" in check_output("cfn", 2, 4, 0, json.dumps(cfn), "")["error"]


@pytest.mark.parametrize("args", [["--agents", "abc"], ["--agents", "0,5"], ["--repeat", "0"],
                                  ["--cfn-python", "nolabel"], ["--cfn-python", "x=/no/such/python"]])
def test_bad_arguments_are_one_line_and_exit_2(args):
    proc = whole_process(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("python -m cfn_core.bench.whole_process: error: ")


def test_the_fork_floor_row_echoes_every_payload_and_reaps_every_child(no_leaks):
    for agents, payload in ((5, "x" * 64), (2, "y" * 300_000)):  # 300 kB: more than a pipe holds, both ways
        rep = fork_floor(agents, payload)
        assert rep["planned"] == rep["delivered"] == 2 * agents and rep["failed"] == 0
        assert set(rep["phases"]) == {"spawn", "distribute", "execute", "shutdown"}
        assert rep["seconds"] >= sum(rep["phases"].values()) * 0.99
