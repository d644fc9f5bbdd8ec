"""``cfn bench`` end to end: real coordinations, real reference rows, real report files."""

import json
import os
import subprocess
import sys

import pytest

from cfn_core.plugins import installed
from cfn_core.testing import install_dist


def cfn_bench(*args, cwd=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "cfn_core", "bench", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.skipif("pool" not in installed(), reason="the pool plugin is not installed")
def test_baseline_and_pool_end_to_end(tmp_path, bus_root, no_leaks):
    out = tmp_path / "report"
    proc = cfn_bench(
        "--agents", "6", "--combinations", "baseline,pool", "--repetitions", "2",
        "--set", f"bus.root={bus_root}", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    # progress on stderr (one line per cell when stderr is not a terminal), the report on stdout
    assert "cfn bench: [1/5]" in proc.stderr and "cfn bench: [5/5]" in proc.stderr
    assert "# cfn Optimization Impact Report" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    cells = {c["id"]: c for c in report["cells"]}
    assert list(cells) == ["baseline-6", "pool-6", "ref-processpool-6", "ref-mp-pipes-6", "ref-floor-6"]
    for c in cells.values():
        assert c["delivery_rate"] == 1.0
        assert c["repetitions"] == 2 and len(c["seconds"]) == 2
        assert c["p50"] > 0 and c["peak_pss_bytes"] > 0 and c["peak_processes"] >= 1, c["id"]
        assert c["error_rate_per_1000"] == 0
    assert cells["baseline-6"]["improvement"] == 1.0
    assert cells["pool-6"]["improvement"] == pytest.approx(cells["baseline-6"]["p50"] / cells["pool-6"]["p50"])
    assert cells["baseline-6"]["phases"]["spawn"] > 0 and cells["baseline-6"]["latency_p50"] > 0
    assert report["machine"]["cores"] == os.cpu_count() and report["machine"]["python"]
    assert report["runner"]["mode"] == "serial"
    assert "cfn-pool" in report["machine"]["versions"]
    assert (tmp_path / "report.md").read_text().count("| pool |") >= 1


def test_unknown_plugin_is_a_one_line_error_naming_the_installed_ones(tmp_path):
    proc = cfn_bench("--agents", "2", "--combinations", "baseline,poool", "--output", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("cfn: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown plugin 'poool'" in proc.stderr and "installed:" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--agents", "ten"], "[bench] agents = 'ten'"),
        (["--workloads", "ring"], "each one of star, mesh"),
        (["--set", "bench.nope=1"], "unknown key 'nope' in [bench]"),
    ],
)
def test_bad_matrix_settings_are_one_line_errors(args, message):
    proc = cfn_bench(*args, "--list")
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_list_prints_the_cells_without_running_them():
    proc = cfn_bench("--agents", "100,50", "--combinations", "baseline", "--workloads", "star,mesh", "--list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "baseline-50", "ref-processpool-50", "ref-mp-pipes-50", "ref-floor-50", "baseline-50-mesh",
        "baseline-100", "ref-processpool-100", "ref-mp-pipes-100", "ref-floor-100", "baseline-100-mesh",
    ]


def test_mesh_cells_run_and_count_peer_messages(tmp_path, bus_root, no_leaks):
    proc = cfn_bench(
        "--agents", "3", "--combinations", "baseline", "--workloads", "mesh", "--repetitions", "1",
        "--set", "bench.mesh_messages=4", "--set", f"bus.root={bus_root}", "--output", str(tmp_path / "r"), "--json",
    )
    assert proc.returncode == 0, proc.stderr
    (cell,) = json.loads(proc.stdout)["cells"]
    assert cell["id"] == "baseline-3-mesh"
    assert cell["messages_planned"] == 2 * 3 + 3 * 4 and cell["delivery_rate"] == 1.0


def test_sigterm_stops_the_matrix_and_writes_the_cells_measured(tmp_path, bus_root, no_leaks):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "cfn_core", "bench", "--agents", "2,40", "--combinations", "baseline", "--no-references",
         "--repetitions", "1", "--set", f"bus.root={bus_root}", "--output", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert "cfn bench: [1/2]" in proc.stderr.readline()  # the first cell is done, the second one runs
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True
    assert [c["id"] for c in report["cells"]] == ["baseline-2"]
    assert "Interrupted" in out


BROKEN_PLUGIN = '''\
"""A third-party plugin whose only step always raises: cfn falls back to the baseline on every call."""
from cfn_core import hookimpl


@hookimpl
def cfn_assign(ctx, task, agent_ids):
    raise RuntimeError("alwaysbroken: this plugin never works")
'''


@pytest.fixture
def third_party_env(tmp_path):
    """An environment in which a third-party plugin ``alwaysbroken`` is installed.

    A real entry point in group ``cfn`` (a ``*.dist-info`` on ``PYTHONPATH``, which is all
    ``pip install`` leaves behind), found by ``importlib.metadata`` like any installed
    distribution; the shared environment is left alone.
    """
    site = tmp_path / "site"
    install_dist(site, "cfn-alwaysbroken", {"alwaysbroken": "cfn_alwaysbroken"}, modules={"cfn_alwaysbroken": BROKEN_PLUGIN})
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_the_default_matrix_lists_the_bundled_plugins_only(third_party_env):
    proc = subprocess.run([sys.executable, "-m", "cfn_core", "bench", "--agents", "2", "--no-references", "--list"],
                          capture_output=True, text=True, timeout=120, env=third_party_env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    cells = proc.stdout.split()
    assert not [c for c in cells if "alwaysbroken" in c], cells
    bundled = sorted(n for n in ("batch", "parallel", "pool", "shard") if n in installed())
    assert cells[0] == "baseline-2" and "+".join(bundled) + "-2" in cells
    # installed all the same: named, it is benchmarked
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core", "bench", "--agents", "2", "--no-references", "--combinations", "alwaysbroken", "--list"],
        capture_output=True, text=True, timeout=120, env=third_party_env, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.split() == ["baseline-2", "alwaysbroken-2"], proc.stderr


def test_a_cell_whose_plugin_falls_back_fails_instead_of_passing_as_the_baseline(tmp_path, bus_root, third_party_env, no_leaks):
    """Cells run strict: the plugin's failure stops the cell, it is not timed as the baseline under its name."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "cfn_core", "bench", "--agents", "2", "--combinations", "alwaysbroken", "--no-references",
         "--repetitions", "1", "--set", f"bus.root={bus_root}", "--output", str(out)],
        capture_output=True, text=True, timeout=240, env=third_party_env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cells = {c["id"]: c for c in json.loads((tmp_path / "report.json").read_text())["cells"]}
    assert cells["baseline-2"]["status"] == "PASS"
    broken = cells["alwaysbroken-2"]
    assert broken["status"] != "PASS"
    assert broken["fallbacks"] == 0  # strict: nothing ran the baseline in its place
    assert any("this plugin never works" in m for m in broken["error_messages"]), broken["error_messages"]
    assert "alwaysbroken-2: " in proc.stdout  # listed under "Errors"
