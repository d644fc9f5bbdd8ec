"""cfn's pytest plugin (entry point ``pytest11``): test fixtures and the benchmark matrix.

Fixtures (``make_config``, ``bus_root``, ``no_leaks``) come from :mod:`cfn_core.testing`.

The benchmark matrix (``[bench]`` in cfn.toml) becomes tests under ``-m bench``:
``pytest -n auto -m bench`` times every cell and writes one report on the
controller (see :mod:`cfn_core.bench.pytest_bench` and docs/BENCHMARKS.md).
Without ``-m bench`` nothing of it is loaded.
"""

from __future__ import annotations

from cfn_core.testing import bus_root, make_config, no_leaks  # noqa: F401  (fixtures)


def pytest_addoption(parser):
    group = parser.getgroup("cfn-bench", "cfn benchmark matrix (-m bench)")
    group.addoption("--bench-config", metavar="PATH", default=None,
                    help="cfn.toml with the [bench] matrix (default: found upward from the current directory)")
    group.addoption("--bench-agents", metavar="N,N", default=None, help="override [bench] agents, e.g. 10,20")
    group.addoption("--bench-combinations", metavar="C,C", default=None,
                    help="override [bench] combinations, e.g. baseline,pool,pool+batch")
    group.addoption("--bench-report", metavar="PREFIX", default=None,
                    help="write PREFIX.json/.md/.png (default: [bench] output)")
    group.addoption("--bench-compare", metavar="PATH", default=None,
                    help="regression gate: fail the session if a cell is >10%% slower than in this JSON report")
    group.addoption("--bench-parallel", action="store_true", default=False,
                    help="let timing cells overlap on xdist workers (throughput over precision)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a cfn benchmark matrix cell (run with -m bench)")
    from cfn_core.bench.pytest_bench import bench_selected

    if bench_selected(config) and not config.pluginmanager.has_plugin("cfn-bench"):
        from cfn_core.bench.pytest_bench import BenchPlugin

        config.pluginmanager.register(BenchPlugin(config), "cfn-bench")
