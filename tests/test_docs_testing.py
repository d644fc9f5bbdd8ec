"""docs/TESTING.md: coverage follows agents where it says it does.

A small coordination is run under `coverage run` with the repository's configuration
(pyproject.toml, [tool.coverage.*]), once on the baseline (agents are fresh interpreters)
and once with the pool (agents forked from a zygote).  Every agent must leave its own data
file, and the agent loop, which only agents run, must be measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
from cfn_core import Coordinator
from cfn_core.config import config_from_dict

for plugins in ([], ["pool"]):
    config = config_from_dict({"plugins": plugins, "workload": {"agents": 2}, "pool": {"size": 2}})
    with Coordinator(config) as coord:
        assert coord.run().ok
"""


def test_coverage_follows_fresh_and_forked_agents(tmp_path, bus_root, no_leaks):
    coverage = pytest.importorskip("coverage")
    from cfn_core.plugins import installed

    if "pool" not in installed():
        pytest.skip("needs the bundled pool plugin (pip install -r requirements.txt)")
    (tmp_path / "run.py").write_text(SCRIPT)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "CFN_"))}  # not an outer run's
    env.update(COVERAGE_FILE=str(data_dir / ".coverage"), CFN_BUS_ROOT=str(bus_root))
    proc = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--rcfile={ROOT / 'pyproject.toml'}", "run.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in data_dir.iterdir())
    # the script, 2 baseline agents, the zygote, 2 forked agents (a pool may start more)
    assert len(files) >= 6, files
    cov = coverage.Coverage(data_file=str(data_dir / ".coverage"), config_file=str(ROOT / "pyproject.toml"))
    cov.combine(data_paths=[str(data_dir)])
    data = cov.get_data()
    agent_py = next(f for f in data.measured_files() if f.endswith(os.path.join("cfn_core", "agent.py")))
    import inspect

    from cfn_core import agent

    lines, first = inspect.getsourcelines(agent.run_agent)
    body = set(range(first + 1, first + len(lines)))
    assert body & set(data.lines(agent_py) or ()), "the agent loop (run only in agents) was not measured"
    assert data.has_arcs(), "branch coverage is configured"
