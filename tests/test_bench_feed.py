"""cfn_core.bench.feed: a small run of both arms (slow: CI runs it); each arm checks its results' sum."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_feed_benchmark_runs_both_arms_and_prints_ratios(bus_root, no_leaks):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core.bench.feed", "--agents", "2,8", "--tasks", "3000", "--single", "20", "--reps", "2"],
        cwd=bus_root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for n in (2, 8):
        for plugins in ("pool,parallel", "pool,parallel,batch"):
            cfn = [ln for ln in lines if re.match(rf"^\s*{n} workers  cfn \({plugins}, prefetch 64\) ", ln)]
            ratio = [ln for ln in lines if re.match(
                rf"^\s*{n} workers  ratio cfn \({plugins}\)/processpool \(median of 2, 3000 tasks\): throughput [\d.]+x", ln)]
            assert len(cfn) == len(ratio) == 1, proc.stdout
            assert "tasks/s  latency p50" in cfn[0] and "single p50" in cfn[0] and "whole process" in cfn[0]
        assert len([ln for ln in lines if re.match(rf"^\s*{n} workers  processpool ", ln)]) == 1, proc.stdout
