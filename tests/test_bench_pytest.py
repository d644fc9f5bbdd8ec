"""The benchmark matrix under pytest: cells as tests, one report on the xdist controller."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cfn_core.bench.resources import ResourceSampler, process_tree

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(pytester, bus_root):
    pytester.makefile(
        ".toml",
        cfn=textwrap.dedent(
            f"""
            [bus]
            root = "{bus_root}"

            [bench]
            agents = [2, 3]
            combinations = ["baseline"]
            repetitions = 1
            output = "out/report"
            """
        ),
    )
    pytester.makepyfile(test_functional="def test_plain():\n    assert True\n")
    pytester.makeini("[pytest]\ncfn_bench = true\n")  # the project asks for the matrix
    return pytester


def _pytest(args, cwd):
    """pytest in a fresh process of this venv, in ``cwd``, without the outer session's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CFN_"))}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_another_project_with_cfn_installed_gets_no_matrix(tmp_path):
    """Installing cfn must not add its benchmarks to someone else's session, whatever -m says."""
    (tmp_path / "test_theirs.py").write_text("def test_one():\n    assert True\n")
    for markexpr in ("not slow", "bench", "bench or not bench"):
        proc = _pytest(["--co", "-q", "-p", "no:cacheprovider", "-m", markexpr], tmp_path)
        collected = [line for line in proc.stdout.splitlines() if "::" in line]
        if markexpr == "bench":
            assert collected == [], proc.stdout
        else:
            assert collected == ["test_theirs.py::test_one"], proc.stdout + proc.stderr
    proc = _pytest(["-q", "-p", "no:cacheprovider", "-m", "not slow"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_theirs.py"]  # no bench-report.*


def test_cfn_bench_option_asks_for_the_matrix_in_any_project(project):
    (project.path / "tox.ini").unlink()  # no opt-in in the configuration
    result = project.runpytest_subprocess("--co", "-q", "-p", "no:cacheprovider", "-m", "bench")
    assert "bench[" not in result.stdout.str()
    result = project.runpytest_subprocess("--co", "-q", "-p", "no:cacheprovider", "--cfn-bench", "-m", "bench")
    result.stdout.fnmatch_lines(["cfn.toml::bench[[]baseline-2[]]", "cfn.toml::bench[[]ref-mp-pipes-3[]]"])
    result = project.runpytest_subprocess("--co", "-q", "-p", "no:cacheprovider", "--cfn-bench")
    result.stdout.fnmatch_lines(["test_functional.py::test_plain", "cfn.toml::bench[[]baseline-2[]]"])


def test_this_repository_opts_in_through_its_pyproject():
    proc = _pytest(["--co", "-q", "-m", "bench", "tests/test_bench_matrix.py"], ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cfn.toml::bench[baseline-100]" in proc.stdout
    proc = _pytest(["--co", "-q", "tests/test_bench_matrix.py"], ROOT)  # addopts: -m 'not bench'
    assert "bench[" not in proc.stdout


def test_n2_merges_every_worker_row_into_one_report(project, no_leaks):
    result = project.runpytest_subprocess("-n", "2", "-m", "bench", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    for line in ("*PASSED cfn.toml::bench[[]baseline-2[]]*", "*PASSED cfn.toml::bench[[]ref-mp-pipes-3[]]*"):
        result.stdout.fnmatch_lines([line])  # one at a time: workers finish in any order
    result.stdout.fnmatch_lines(
        ["*cfn bench: Optimization Impact Report*", "pytest -n 2; one timing cell at a time on * cores; 8 cell(s)"]
    )
    # the report is written once, by the controller, with the rows of both workers
    assert result.stdout.str().count("cfn bench: Optimization Impact Report") == 1
    report = json.loads((project.path / "out" / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == [
        "baseline-2", "ref-processpool-2", "ref-mp-pipes-2", "ref-floor-2", "baseline-3", "ref-processpool-3", "ref-mp-pipes-3", "ref-floor-3",
    ]
    assert report["runner"] == {
        "tool": "pytest -n 2", "mode": "serial", "workers": 2,
        "description": report["runner"]["description"],
    }
    assert "not_run" not in report
    assert (project.path / "out" / "report.md").read_text().startswith("# cfn Optimization Impact Report")


def test_timing_tests_do_not_overlap_unless_asked(project):
    """Serial mode: the spans of the cells and of a plugin's own bench test, on two workers, never intersect."""
    project.makepyfile(
        test_own_bench=textwrap.dedent(
            """
            import json, os, time
            import pytest

            @pytest.mark.bench
            @pytest.mark.parametrize("i", range(3))
            def test_own_timing(i):
                start = time.time()
                sum(range(200_000))
                with open(f"span-{i}.json", "w") as f:
                    json.dump([start, time.time()], f)
            """
        )
    )
    result = project.runpytest_subprocess("-n", "2", "-m", "bench", "-p", "no:cacheprovider", "--bench-report", "serial")
    result.assert_outcomes(passed=11)
    cells = json.loads((project.path / "serial.json").read_text())["cells"]
    own = [tuple(json.loads((project.path / f"span-{i}.json").read_text())) for i in range(3)]
    spans = sorted([(c["started"], c["finished"]) for c in cells] + own)
    for (_s1, end), (start, _e2) in zip(spans, spans[1:]):
        assert start >= end
    result = project.runpytest_subprocess(
        "-n", "2", "-m", "bench", "-p", "no:cacheprovider", "--bench-parallel", "--bench-report", "par"
    )
    result.assert_outcomes(passed=11)
    assert json.loads((project.path / "par.json").read_text())["runner"]["mode"] == "parallel"


def test_without_m_bench_the_matrix_is_not_collected(project):
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (project.path / "out").exists()
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not bench")
    result.assert_outcomes(passed=1)


def test_the_report_stamps_the_sessions_start_and_end(project):
    """created and the first load average are the session's start, finished and the second its end."""
    from datetime import datetime

    # a functional test that ends in the next second: the session cannot start and end in the same one
    project.makepyfile(test_tick=textwrap.dedent(
        """
        import time

        def test_into_the_next_second():
            start = int(time.time())
            while int(time.time()) == start:
                time.sleep(0.01)
        """
    ))
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-m", "bench or not bench", "--bench-agents", "2")
    result.assert_outcomes(passed=6)
    report = json.loads((project.path / "out" / "report.json").read_text())

    def epoch(stamp):
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp()

    assert report["created"] < report["finished"]
    assert epoch(report["created"]) <= min(c["started"] for c in report["cells"])
    assert epoch(report["finished"]) >= int(max(c["finished"] for c in report["cells"]))
    assert len(report["machine"]["load_average"]) == len(report["machine"]["load_average_end"]) == 3
    assert report["runner"]["tool"] == "pytest"


def test_compare_fails_the_session_on_a_regression(project):
    old = {
        "format": "cfn-bench-report/1", "created": "x", "runner": {"mode": "serial"}, "machine": {},
        "settings": {}, "cells": [{"id": "baseline-2", "kind": "cfn", "p50": 1e-6, "plugins": [], "agents": 2,
                                   "workload": "star", "combination": "baseline", "label": "baseline"}],
    }
    (project.path / "old.json").write_text(json.dumps(old))
    result = project.runpytest_subprocess(
        "-m", "bench", "-p", "no:cacheprovider", "--bench-agents", "2", "--bench-compare", "old.json"
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["REGRESSION: 1 cell(s)", "  baseline-2: *slower*"])


def test_unknown_plugin_in_the_matrix_is_a_usage_error(project):
    result = project.runpytest_subprocess("-m", "bench", "-p", "no:cacheprovider", "--bench-combinations", "nosuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cfn bench: *unknown plugin 'nosuch'*installed:*"])


def test_sampler_sees_children_memory_and_cpu(no_leaks):
    sampler = ResourceSampler().start()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sum(range(3_000_000)); sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        while child.pid not in process_tree(sampler.me.pid):
            pass
        sampler.sample()
    finally:
        child.communicate(b"")
    figures = sampler.stop()
    assert figures["peak_processes"] >= 1
    assert figures["peak_pss_bytes"] > 5 * 2**20  # this process and a Python child
    assert figures["cpu_seconds"] > 0 and figures["samples"] >= 1
