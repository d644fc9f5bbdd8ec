"""examples/hosted: the README's command works as written (real host processes, real bus)."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hosted"


def test_researchers_call_the_fake_llm_message_their_neighbours_and_report(bus_root, no_leaks):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    proc = subprocess.run([sys.executable, "run.py", "--agents", "400"], cwd=EXAMPLE, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "400 researchers in " in out and "_host.worker.1" in out
    assert "reports: 400/400, delivery 1.000, ring intact: True" in out
    assert out.rstrip().endswith("hosted example OK")


def test_the_example_asks_for_ten_thousand_hosted_agents():
    text = (EXAMPLE / "cfn.toml").read_text()
    assert "agents = 10000" in text and 'host = "async"' in text
