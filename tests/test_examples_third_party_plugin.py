"""examples/third-party-plugin: the plugin author's path, end to end.

The package is built and installed the way a user installs it (pip, from its own
pyproject.toml), into a private directory put on PYTHONPATH for the processes
these tests start, so the shared environment is left alone.  Then: cfn finds it
by its entry point, `cfn run` with its name enabled writes the trace, and the
package's own test suite passes.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "third-party-plugin"


@pytest.fixture(scope="module")
def tracer_env(tmp_path_factory):
    """Environment in which cfn-tracer is installed (pip install, not a path hack).

    Built once per test session: xdist workers share the directory above their own
    base temp, and the first one to take the lock does the install.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's own
    target = shared / "cfn-tracer-site"
    with open(shared / "cfn-tracer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "cfn_tracer" / "__init__.py").exists():
            # build from a copy: setuptools writes build/ and *.egg-info next to the sources
            source = tmp_path_factory.mktemp("tracer-src") / "cfn-tracer"
            shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "cfn_tracer" / "__init__.py").exists()
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def cfn_command() -> list[str]:
    script = Path(sys.executable).with_name("cfn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cfn_core"]


def test_cfn_plugins_lists_it(tracer_env):
    proc = subprocess.run(
        cfn_command() + ["plugins", "--json", "--plugins", "tracer"],
        env=tracer_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(r for r in json.loads(proc.stdout) if r["name"] == "tracer")
    assert row["distribution"] == "cfn-tracer" and row["version"] == "0.1.0" and row["status"] == "enabled"
    assert set(row["hooks"]) == {"cfn_settings", "cfn_configure", "cfn_send", "cfn_report"}
    assert row["call_order"]["cfn_send"][-2:] == ["tracer", "builtin"]


def test_naming_it_in_cfn_toml_is_all_it_takes(tracer_env, tmp_path, bus_root, no_leaks):
    trace = tmp_path / "trace.jsonl"
    (tmp_path / "cfn.toml").write_text(
        f'plugins = ["tracer"]\n\n[workload]\nagents = 3\n\n[tracer]\npath = "{trace}"\n'
        f'\n[bus]\nroot = "{bus_root}"\n'
    )
    proc = subprocess.run(
        cfn_command() + ["run", "--json"],
        env=tracer_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plugins"] == ["tracer"]
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert out["plugin_figures"]["tracer"] == {"path": str(trace), "records": len(lines)}
    kinds = Counter(r["kind"] for r in lines)
    assert kinds == {"ready": 3, "task": 3, "result": 3, "stop": 3}


def test_a_bad_tracer_setting_is_one_clear_line(tracer_env, tmp_path):
    proc = subprocess.run(
        cfn_command() + ["run", "--plugins", "tracer", "--set", f"tracer.path={tmp_path}/missing/t.jsonl"],
        env=tracer_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "[tracer] path" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_the_package_own_tests_pass(tracer_env):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q"],
        env=tracer_env, cwd=EXAMPLE, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
