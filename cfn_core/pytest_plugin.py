"""cfn's pytest plugin (entry point ``pytest11``): test fixtures and, on request, the benchmark matrix.

Fixtures (``make_config``, ``bus_root``, ``no_leaks``) come from :mod:`cfn_core.testing`.

The benchmark matrix (``[bench]`` in cfn.toml) is **opt-in**: installing cfn
must not add 500-agent benchmarks to someone else's test session.  A project
asks for it with ``cfn_bench = true`` in its pytest configuration (this
repository does, in pyproject.toml), and then ``-m bench`` selects it:
``pytest -n auto -m bench`` times every cell and writes one report on the
controller (see :mod:`cfn_core.bench.pytest_bench` and docs/BENCHMARKS.md).
``--cfn-bench`` asks for it from the command line, in any project.  Without
either, nothing of it is loaded, whatever ``-m`` says.
"""

from __future__ import annotations

from cfn_core.testing import bus_root, make_config, no_leaks  # noqa: F401  (fixtures)

#: the ini key (pytest.ini, tox.ini, setup.cfg, [tool.pytest.ini_options]) that opts a project in
INI_KEY = "cfn_bench"


def pytest_addoption(parser):
    parser.addini(INI_KEY, type="bool", default=False,
                  help="collect cfn's benchmark matrix ([bench] in cfn.toml) when -m selects 'bench'")
    group = parser.getgroup("cfn-bench", "cfn benchmark matrix (opt-in: --cfn-bench or the cfn_bench ini key)")
    group.addoption("--cfn-bench", action="store_true", default=False, dest="cfn_bench",
                    help="collect cfn's benchmark matrix in this session (without -m: run it; "
                         "with -m: when it selects 'bench')")
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
    from cfn_core.bench.pytest_bench import bench_requested, opted_in

    if not opted_in(config):
        return  # someone else's project: no marker, no matrix
    config.addinivalue_line("markers", "bench: a cfn benchmark matrix cell (run with -m bench)")
    if bench_requested(config) and not config.pluginmanager.has_plugin("cfn-bench"):
        from cfn_core.bench.pytest_bench import BenchPlugin

        config.pluginmanager.register(BenchPlugin(config), "cfn-bench")
