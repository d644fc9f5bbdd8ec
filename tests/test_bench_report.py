"""Report rendering from a fixed JSON report: ratios, targets, additivity, gate, files."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from cfn_core.bench.analysis import analyze
from cfn_core.bench.render import load_report, render_markdown, write_report
from cfn_core.bench.runner import summarize
from cfn_core.bench.matrix import Cell
from cfn_core.config import config_from_dict

SETTINGS = {
    "agents": [100, 500], "combinations": ["default"], "plugins": [], "workloads": ["star"], "mesh_messages": 5,
    "rounds": 1, "repetitions": 3, "cell_budget": 60.0, "references": True, "target_seconds": 10.0,
    "min_delivery": 0.9, "min_improvement": 5.0, "bar_seconds": 0.6, "bar_improvement": 20.0,
    "regression": 0.1, "output": "bench-report", "parallel": False,
}


def cell(plugins, n, p50, delivery=1.0, reference="", phases=None):
    c = Cell(plugins=tuple(plugins), agents=n, workload="star", reference=reference).to_dict()
    c.update(
        repetitions=3, rounds=1, coordinations=3, seconds=[p50 * 0.9, p50, p50 * 1.2], p50=p50, p95=p50 * 1.18,
        p99=p50 * 1.196, min=p50 * 0.9, warm_round_p50=None, messages_planned=2 * n, messages_delivered=int(2 * n * delivery),
        delivery_rate=delivery, messages_per_second=2 * n / p50, phases=phases or {"spawn": p50 * 0.8, "execute": p50 * 0.2},
        latency_p50=0.004, latency_p99=0.02, peak_pss_bytes=n * 8 * 2**20, pss_estimated=False, peak_fds=3 * n,
        peak_processes=n, cpu_percent=150.0, sampling_seconds=0.1, errors=0, error_rate_per_1000=0.0,
        error_messages=[], fallbacks=0, plugin_figures={}, reps=[],
    )
    return c


def fixed_report():
    return {
        "format": "cfn-bench-report/1",
        "created": "2026-11-24T01:00:00Z",
        "runner": {"tool": "cfn bench", "mode": "serial", "workers": 1, "description": "cfn bench; one timing cell at a time on 2 cores"},
        "machine": {"cores": 2, "python": "3.11.7", "versions": {"cfn-core": "0.1.0"}, "load_average": [0.5, 0.4, 0.3]},
        "settings": dict(SETTINGS),
        "workload": {"handler": "cfn_core.handlers:echo", "command": "", "payload_bytes": 64},
        "cells": [
            cell([], 500, 60.0),
            cell(["pool"], 500, 3.0, phases={"session": 2.0, "execute": 1.0}),
            cell(["batch"], 500, 50.0),
            cell(["pool", "batch"], 500, 2.5),
            cell([], 500, 1.0, reference="processpool"),
            cell([], 100, 12.0),
            cell(["pool"], 100, 0.5),
            cell(["batch"], 100, 10.0),
            cell(["pool", "batch"], 100, 0.4, delivery=0.85),
        ],
    }


def by_id(report):
    return {c["id"]: c for c in report["cells"]}


def test_improvement_status_and_bottleneck_come_from_the_same_report():
    report = analyze(fixed_report())
    cells = by_id(report)
    assert cells["pool-500"]["improvement"] == pytest.approx(20.0)
    assert cells["ref-processpool-500"]["improvement"] == pytest.approx(60.0)
    assert cells["pool-500"]["bottleneck"] == "session"
    assert cells["baseline-500"]["status"] == "FAIL"  # 60 s > 10 s
    assert cells["pool+batch-500"]["is_combined"] and cells["pool+batch-500"]["status"] == "PASS"
    assert cells["pool+batch-100"]["checks"] == {"time": True, "delivery": False, "improvement": True}
    assert cells["pool+batch-100"]["status"] == "FAIL"


def test_additivity_compares_the_combined_gain_with_the_product_of_single_gains():
    report = analyze(fixed_report())
    (row,) = [a for a in report["additivity"] if a["agents"] == 500]
    assert row["individual_gains"] == {"pool": pytest.approx(20.0), "batch": pytest.approx(1.2)}
    assert row["gain"] == pytest.approx(24.0)
    assert row["ratio"] == pytest.approx(1.0)
    assert row["verdict"].startswith("additive")


def test_decision_gate_at_the_largest_n_and_our_bar():
    (gate,) = analyze(fixed_report())["decision_gate"]
    assert gate["agents"] == 500 and gate["combination"] == "pool+batch"
    assert gate["outcome"] == "GO"
    assert gate["bar"] == {"time": False, "improvement": True}  # 2.5 s > 0.6 s
    slow = fixed_report()
    by_id(slow)["pool+batch-500"]["p50"] = 12.0
    assert analyze(slow)["decision_gate"][0]["outcome"] == "PIVOT"
    by_id(slow)["pool+batch-500"]["p50"] = 16.0
    assert analyze(slow)["decision_gate"][0]["outcome"] == "NO-GO"


def test_markdown_has_the_impact_report_every_cell_phases_and_additivity():
    md = render_markdown(fixed_report())
    assert "## Decision gate" in md and "**GO**" in md
    assert "## Optimization Impact Report: 500 agents, star" in md
    assert "pool:" in md and "(20.0x)" in md
    assert "concurrent.futures.ProcessPoolExecutor" in md
    assert "| pool+batch | 100 | star |" in md and "85.0%" in md
    assert "## Where the time goes" in md
    assert "## Are the optimizations additive?" in md and "additive" in md
    assert "2 cores" in md


def test_write_report_writes_json_md_and_png_and_reads_back(tmp_path):
    paths = write_report(fixed_report(), tmp_path / "out" / "rep")
    names = sorted(p.name for p in paths)
    expected = ["rep.json", "rep.md"]
    try:
        import matplotlib  # noqa: F401

        expected.append("rep.png")
        assert (tmp_path / "out" / "rep.png").read_bytes()[:4] == b"\x89PNG"
        assert "![coordination time" in (tmp_path / "out" / "rep.md").read_text()
    except ImportError:
        pass
    assert names == sorted(expected)
    again = load_report(tmp_path / "out" / "rep.json")
    assert by_id(again)["pool-500"]["improvement"] == pytest.approx(20.0)


def test_cfn_bench_render_only_renders(tmp_path):
    """--render writes the Markdown (and PNG) of a report: its JSON is untouched, stdout stays quiet."""
    src = tmp_path / "fixed.json"
    src.write_text(json.dumps(fixed_report()))
    original = src.read_bytes()
    for output in (["--output", str(tmp_path / "again")], []):
        proc = subprocess.run([sys.executable, "-m", "cfn_core", "bench", "--render", str(src), *output],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""
        md = tmp_path / ("again.md" if output else "fixed.md")
        assert md.read_text().startswith("# cfn Optimization Impact Report")
        assert f"wrote {md}" in proc.stderr and ".json" not in proc.stderr
        assert src.read_bytes() == original
    assert not (tmp_path / "again.json").exists()


def test_without_matplotlib_the_report_says_the_chart_was_skipped(tmp_path):
    src = tmp_path / "fixed.json"
    src.write_text(json.dumps(fixed_report()))
    hide_matplotlib = (
        "import sys; sys.modules['matplotlib'] = None; from cfn_core.cli import main; "
        f"sys.exit(main(['bench', '--render', {str(src)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", hide_matplotlib], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cfn bench: chart skipped: matplotlib is not installed (the plot extra" in proc.stderr
    assert "No chart: chart skipped: matplotlib is not installed" in (tmp_path / "fixed.md").read_text()
    assert not (tmp_path / "fixed.png").exists()


def test_the_plot_extra_is_in_the_test_requirements():
    """The PNG is part of what the tests check, so the test environment has matplotlib."""
    root = Path(__file__).resolve().parents[1]
    lines = [line.split("#")[0].strip() for line in (root / "requirements-test.txt").read_text().splitlines()]
    assert any(line.startswith("matplotlib") for line in lines)


@pytest.mark.parametrize("content, message", [("{", "not JSON"), ('{"cells": []}', "not a cfn bench report")])
def test_a_file_that_is_not_a_report_is_a_one_line_error(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "cfn_core", "bench", "--render", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_summarize_counts_errors_per_1000_coordinations_and_keeps_the_reps():
    bench = config_from_dict({}).section("bench")
    ok = {"seconds": 1.0, "error": None, "planned": 4, "delivered": 4, "phases": {"spawn": 0.7, "execute": 0.3},
          "rounds": [{"seconds": 0.9, "ok": True, "latency_p50": 0.01, "latency_p99": 0.02, "errors": []}],
          "resources": {"peak_pss_bytes": 100, "pss_estimated": False, "peak_fds": 10, "peak_processes": 2,
                        "cpu_percent": 50.0, "sampling_seconds": 0.01}}
    crashed = {"seconds": None, "error": "BusError: gone", "rounds": [], "resources": ok["resources"]}
    s = summarize(Cell(plugins=("pool",), agents=2, workload="star"), [ok, dict(ok, seconds=3.0), crashed], bench)
    assert s["p50"] == 2.0 and s["repetitions"] == 3
    assert s["errors"] == 1 and s["error_rate_per_1000"] == pytest.approx(1000 / 3)
    assert s["error_messages"] == ["BusError: gone"]
    assert s["delivery_rate"] == 1.0
    assert len(s["reps"]) == 3


def test_every_time_is_also_a_ratio_to_the_fork_floor():
    """The floor reference row divides every row at its N: the report shows how far above it each one is."""
    report = fixed_report()
    report["cells"].append(cell([], 500, 0.5, reference="floor"))
    cells = by_id(analyze(report))
    assert cells["pool-500"]["vs_floor"] == pytest.approx(6.0)
    assert cells["ref-processpool-500"]["vs_floor"] == pytest.approx(2.0)
    assert cells["ref-floor-500"]["vs_floor"] == pytest.approx(1.0)
    assert cells["pool-100"]["vs_floor"] is None  # no floor row measured at 100
    md = render_markdown(report)
    assert "| vs floor |" in md
    assert "fork floor (os.fork + one pipe message)" in md
    assert "(20.0x) 6.0x the floor" in md
