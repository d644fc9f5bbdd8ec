"""examples/talk: the README's commands work as written (real agents, real bus, real cfn msg)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "talk"


def run_flows(bus_root, *args):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the environment's cfn
    return subprocess.run([sys.executable, "flows.py", *args], cwd=EXAMPLE, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args", [("--shell",), ("--plugins", "batch,shard,pool")], ids=["baseline+shell", "plugins"])
def test_flows(bus_root, no_leaks, args):
    proc = run_flows(bus_root, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "five status updates: [1, 2, 3, 4, 5]" in out
    assert out.count(": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]") == 3
    assert "relay: ['agent-0001'" in out or "relay: ['pool-" in out
    assert out.rstrip().endswith("all flows OK")
    if "--shell" in args:
        assert "says agent-" in out and "ms per call" in out
