"""The benchmark matrix as pytest tests: ``pytest -n auto -m bench``.

:mod:`cfn_core.pytest_plugin` registers :class:`BenchPlugin` only in a project
that opted in (``cfn_bench = true`` in its pytest configuration, or
``--cfn-bench``) and then when the marker expression selects ``bench`` (or,
with ``--cfn-bench``, when there is no ``-m``).  Every cell of ``[bench]`` becomes an item
``cfn.toml::bench[pool+batch-500]`` marked ``bench``.

Honest timing under pytest-xdist:

* timing tests never overlap by default: every item marked ``bench`` (the
  cells, and plugins' own ``@pytest.mark.bench`` tests) carries
  ``xdist_group("cfn-bench")`` and, whatever the distribution mode, holds an
  exclusive lock file while it runs, so the other workers wait (or run
  functional tests); ``--bench-parallel`` (or
  ``[bench] parallel = true``) lets them overlap, and the report says so;
* each worker keeps its cells' figures in ``config.workeroutput`` (as
  pytest-cov does); the controller merges them in ``pytest_testnodedown`` and
  writes one report at the end of the session, on the controller only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..errors import CfnError

OUTPUT_KEY = "cfn_bench"
LOCK_KEY = "cfn_bench_lock"
GROUP = "cfn-bench"


def opted_in(config) -> bool:
    """True when this session asked for the matrix: ``--cfn-bench`` or the ``cfn_bench`` ini key."""
    return bool(config.getoption("cfn_bench", False) or config.getini("cfn_bench"))


def bench_requested(config) -> bool:
    """Whether to collect the matrix: opted in, and ``-m`` selects ``bench`` (``--cfn-bench`` alone: yes)."""
    if not opted_in(config):
        return False
    if not (config.option.markexpr or "").strip():
        return bool(config.getoption("cfn_bench", False))
    return bench_selected(config)


def bench_selected(config) -> bool:
    """True when ``-m`` would keep an item marked only ``bench`` (``-m bench``, ``-m "bench or slow"``)."""
    expr = (config.option.markexpr or "").strip()
    if not expr:
        return False
    try:
        from _pytest.mark.expression import Expression

        compiled = Expression.compile(expr)
        try:
            return bool(compiled.evaluate(lambda name, **kw: name == "bench"))
        except TypeError:  # older matcher signature
            return bool(compiled.evaluate(lambda name: name == "bench"))
    except Exception:  # noqa: BLE001  (a private API that may move: fall back to reading it)
        return "bench" in expr and "not bench" not in expr


class CellFailed(Exception):
    """A cell crashed, lost tasks or delivered under the floor."""


class BenchItem(pytest.Item):
    """One cell of the matrix."""

    def __init__(self, *, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell

    def runtest(self) -> None:
        plugin: BenchPlugin = self.config.pluginmanager.get_plugin("cfn-bench")
        from .runner import cell_problems, run_cell

        summary = run_cell(self.cell, plugin.base, plugin.bench)  # inside the timing slot (pytest_runtest_call)
        plugin.record(summary)
        problems = cell_problems(summary, plugin.bench.min_delivery)
        if problems:
            raise CellFailed("; ".join(problems))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (CellFailed, CfnError)):
            return f"bench[{self.cell.id}]: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"bench[{self.cell.id}]"


class BenchPlugin:
    """Collects the matrix, times cells, merges worker results, writes the report."""

    def __init__(self, config) -> None:
        from ..config import load_config
        from .matrix import expand, installed_plugins, optimization_plugins

        self.config = config
        overrides = {}
        if config.getoption("bench_agents"):
            overrides["bench.agents"] = config.getoption("bench_agents")
        if config.getoption("bench_combinations"):
            overrides["bench.combinations"] = config.getoption("bench_combinations")
        try:
            self.base = load_config(config.getoption("bench_config"), overrides=overrides)
            self.bench = self.base.section("bench")
            self.cells = expand(self.bench, installed_plugins(), optimization_plugins())
        except CfnError as exc:
            raise pytest.UsageError(f"cfn bench: {exc}") from None
        self.parallel = bool(config.getoption("bench_parallel") or self.bench.parallel)
        self.results: dict[str, dict] = {}
        self.workers: set[str] = set()
        self.lock_dir: str | None = None
        self.report_paths: list[Path] = []
        self.report: dict | None = None
        self.started_report: dict | None = None  # the skeleton, made at the session's start (controller)
        self.comparison: str | None = None
        self.regressed = False

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    # ------------------------------------------------------------------ collection

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        path = Path(self.base.path) if self.base.path else Path(str(config.rootpath))
        try:
            prefix = path.relative_to(config.rootpath).as_posix() if self.base.path else "cfn-bench"
        except ValueError:
            prefix = path.name
        timeout_off = config.pluginmanager.hasplugin("timeout")
        made = []
        for cell in self.cells:
            name = f"bench[{cell.id}]"
            item = BenchItem.from_parent(session, name=name, nodeid=f"{prefix}::{name}", path=path, cell=cell)
            item.add_marker("bench")
            items.append(item)
            made.append(item)
        # count them like collected items in "collected N items" (they come from no file)
        session.ihook.pytest_collectreport(report=pytest.CollectReport(prefix, "passed", None, made))
        # every timing test, ours or a plugin's own @pytest.mark.bench test, takes turns
        for item in items:
            if item.get_closest_marker("bench") is None:
                continue
            if not self.parallel:
                item.add_marker(pytest.mark.xdist_group(GROUP))
            if timeout_off and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(0))  # waiting for the timing lock is not a hang

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        if item.get_closest_marker("bench") is None:
            return (yield)
        with self.timing_slot():
            return (yield)

    # ------------------------------------------------------------------ timing

    @contextmanager
    def timing_slot(self):
        """Hold the session's timing lock (xdist workers, serial mode); no-op otherwise."""
        path = None if self.parallel or not self.is_worker else self.config.workerinput.get(LOCK_KEY)
        if not path:
            yield
            return
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def record(self, summary: dict) -> None:
        self.results[summary["id"]] = summary
        if self.is_worker:
            self.config.workeroutput[OUTPUT_KEY] = json.dumps(list(self.results.values()), default=str)

    # ------------------------------------------------------------------ xdist controller

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        if self.lock_dir is None:
            self.lock_dir = tempfile.mkdtemp(prefix="cfn-bench-")
        node.workerinput[LOCK_KEY] = os.path.join(self.lock_dir, "timing.lock")

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        self.workers.add(node.gateway.id if getattr(node, "gateway", None) else str(node))
        data = (getattr(node, "workeroutput", None) or {}).get(OUTPUT_KEY)
        if data:
            for summary in json.loads(data):
                self.results[summary["id"]] = summary

    # ------------------------------------------------------------------ the report

    def pytest_sessionstart(self, session) -> None:
        """Stamp the start (time, load average) now: the report is written at the end."""
        if self.is_worker:
            return
        from .runner import new_report

        self.started_report = new_report(self.bench, self.base, tool="pytest", overlap=False, workers=1)

    def pytest_sessionfinish(self, session) -> None:
        if self.is_worker:
            return
        if self.lock_dir is not None:
            shutil.rmtree(self.lock_dir, ignore_errors=True)
        if not self.results:
            return
        from .compare import compare, render_comparison
        from .render import load_report, write_report
        from .runner import finish_report, new_report, runner_info

        workers = len(self.workers) or 1
        tool = f"pytest -n {workers}" if self.workers else "pytest"
        report = self.started_report or new_report(self.bench, self.base, tool=tool, overlap=False, workers=workers)
        report["runner"] = runner_info(tool, overlap=self.parallel and workers > 1, workers=workers)
        order = {c.id: i for i, c in enumerate(self.cells)}
        report["cells"] = sorted(self.results.values(), key=lambda c: order.get(c["id"], len(order)))
        missing = [c.id for c in self.cells if c.id not in self.results]
        if missing:
            report["not_run"] = missing
        prefix = self.config.getoption("bench_report") or self.bench.output
        try:
            self.report_paths = write_report(finish_report(report), prefix)
            old_path = self.config.getoption("bench_compare")
            if old_path:
                result = compare(report, load_report(old_path), regression=self.bench.regression,
                                 min_delivery=self.bench.min_delivery)
                self.comparison = render_comparison(result, old_path)
                if result["regressions"]:
                    self.regressed = True
                    session.exitstatus = pytest.ExitCode.TESTS_FAILED
        except CfnError as exc:
            self.comparison = f"cfn bench: {exc}"
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        self.report = report

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.is_worker or self.report is None:
            return
        from .render import chart_unavailable, fmt_pct, fmt_s, fmt_x

        tr = terminalreporter
        r = self.report
        tr.write_sep("=", "cfn bench: Optimization Impact Report")
        tr.write_line(f"{r['runner']['description']}; {len(r['cells'])} cell(s)")
        for c in r["cells"]:
            tr.write_line(
                f"  {c['id']:<32} p50 {fmt_s(c.get('p50')):>9}  delivery {fmt_pct(c.get('delivery_rate')):>6}  "
                f"{fmt_x(c.get('improvement')):>7} vs baseline  {c['status']}"
            )
        for g in r.get("decision_gate", []):
            tr.write_line(f"decision gate at {g['agents']} agents ({g['workload']}): {g['outcome']}")
        if r.get("not_run"):
            tr.write_line(f"not run: {', '.join(r['not_run'])}")
        if self.comparison:
            tr.write_line(self.comparison)
        if self.report_paths:
            tr.write_line("report: " + ", ".join(str(p) for p in self.report_paths))
            note = chart_unavailable()
            if note:
                tr.write_line(f"cfn bench: {note}")
