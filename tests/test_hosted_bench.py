"""The hosted-agents benchmark (cfn_core/bench/hosted.py) runs every arm and prints ratios; no timing is asserted.

Small sizes, a few seconds: in the default run (not ``-m bench``), so that the tool whose
figures docs/HOSTING.md quotes cannot rot unnoticed.
"""

import json
import subprocess
import sys


def test_hosted_benchmark_runs_every_arm_side_by_side(tmp_path, bus_root, no_leaks):
    out = tmp_path / "hosted.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core.bench.hosted", "--agents", "200", "--process-agents", "20", "--repeat", "1",
         "--rtt", "20", "--sleep", "0.2", "--root", str(bus_root), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "per agent, process / hosted = " in text and "overhead" in text and "KiB" in text
    assert text.count("request/reply") == 3
    figures = json.loads(out.read_text())
    assert len(figures["cold"]["hosted_seconds"]) == len(figures["cold"]["process_seconds"]) == 1
    assert figures["sleep"]["seconds"][0] >= 0.2  # the round cannot beat the fake call it waits for
    assert 0 < figures["memory_bytes_per_agent"] < 1 << 20
    assert set(figures["rtt"]) == {"hosted-same-host", "hosted-two-hosts", "process"}
    assert all(v["n"] == 20 and v["p99"] >= v["p50"] > 0 for v in figures["rtt"].values())


def test_hosted_scale_arm_reports_delivery_phases_and_memory(tmp_path, bus_root, no_leaks):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core.bench.hosted", "--only", "scale", "--agents", "300", "--root", str(bus_root),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scale: 300 hosted agents" in proc.stdout and "delivery 1," in proc.stdout
    s = json.loads(out.read_text())["scale"]
    assert s["ok"] and s["ready"] == 300 and s["delivery"] == 1.0
    assert s["total"] >= s["spawn"] + s["round"] and 0 < s["hosts_uss_bytes"]
