"""The watching-cost benchmark runs and reports both figures (no time is asserted)."""

import re
import subprocess
import sys

import cfn_core.live as live
from cfn_core.bench.snapshot import measure


def test_measure_alternates_both_arms_and_restores_the_snapshot_pace(bus_root, no_leaks):
    before = live.SNAPSHOT_SECONDS
    m = measure(3, 2, str(bus_root))
    assert live.SNAPSHOT_SECONDS == before  # the session's snapshot pace is the module's again
    assert m["agents"] == 3 and 0 < m["snapshot_p50_ms"] <= m["snapshot_p90_ms"]
    assert m["round_on_ms"] > 0 and m["round_off_ms"] > 0 and m["ratio"] > 0


def test_the_command_prints_the_two_figures(bus_root):
    proc = subprocess.run([sys.executable, "-m", "cfn_core.bench.snapshot", "--agents", "2", "--rounds", "1", "--bus-root", str(bus_root)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert re.fullmatch(r"snapshot of 2 agents: p50 [\d.]+ ms, p90 [\d.]+ ms; four a second take [\d.]+% of one core", first)
    assert re.fullmatch(r"warm round, median of 1: snapshot on [\d.]+ ms, off [\d.]+ ms, on/off [\d.]+", second)
    bad = subprocess.run([sys.executable, "-m", "cfn_core.bench.snapshot", "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
