"""The regression gate: a report against an older one (``--compare``)."""

import json
import subprocess
import sys

import pytest

from cfn_core.bench.compare import compare

from .test_bench_report import by_id, fixed_report


def cfn_bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cfn_core", "bench", *args], capture_output=True, text=True, timeout=timeout)


def write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def test_a_cell_more_than_10_percent_slower_fails_the_gate(tmp_path):
    old = write(tmp_path / "old.json", fixed_report())
    slower = fixed_report()
    by_id(slower)["pool-500"]["p50"] = 3.0 * 1.25
    new = write(tmp_path / "new.json", slower)
    proc = cfn_bench("--render", new, "--output", str(tmp_path / "r"), "--compare", old)
    assert proc.returncode == 1
    assert "REGRESSION: 2 cell(s)" in proc.stderr  # pool-500, and pool+batch-100 under the delivery floor
    assert "pool-500: +25% slower: p50 3.75 s against 3.00 s (limit +10%)" in proc.stderr
    assert "pool+batch-100: delivery 85.0% is below the floor 90%" in proc.stderr


def test_within_10_percent_passes(tmp_path):
    base = fixed_report()
    by_id(base)["pool+batch-100"]["delivery_rate"] = 1.0
    old = write(tmp_path / "old.json", base)
    slightly = json.loads(json.dumps(base))
    by_id(slightly)["pool-500"]["p50"] = 3.0 * 1.08
    proc = cfn_bench("--render", write(tmp_path / "new.json", slightly), "--output", str(tmp_path / "r"), "--compare", old)
    assert proc.returncode == 0, proc.stderr
    assert "no regression" in proc.stderr


def test_cells_new_or_missing_are_listed_not_failed():
    old = fixed_report()
    new = fixed_report()
    new["cells"] = [c for c in new["cells"] if c["id"] != "batch-100"]
    old["cells"] = [c for c in old["cells"] if c["id"] != "pool-100"]
    result = compare(new, old, regression=0.1, min_delivery=0.0)
    assert result["regressions"] == []
    assert result["new_cells"] == ["pool-100"] and result["missing"] == ["batch-100"]


def test_a_cell_that_stopped_working_is_a_regression():
    new = fixed_report()
    by_id(new)["pool-500"].update(p50=None, error_messages=["PluginError: boom"])
    result = compare(new, fixed_report(), regression=0.1, min_delivery=0.0)
    assert [r["id"] for r in result["regressions"]] == ["pool-500"]
    assert "PluginError: boom" in result["regressions"][0]["why"]


@pytest.mark.parametrize("target", ["missing.json", "bad.json"])
def test_compare_with_a_missing_or_bad_file_is_a_usage_error(tmp_path, target):
    (tmp_path / "bad.json").write_text("[]")
    new = write(tmp_path / "new.json", fixed_report())
    proc = cfn_bench("--render", new, "--output", str(tmp_path / "r"), "--compare", str(tmp_path / target))
    assert proc.returncode == 2
    assert proc.stderr.startswith("cfn: error: ") and len(proc.stderr.strip().splitlines()) == 1
