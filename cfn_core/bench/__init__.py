"""The benchmark matrix: plugin combinations x agent counts x workloads, and its report.

``cfn bench`` (:mod:`cfn_core.bench.cli`) and ``pytest -m bench`` (the cells as
parametrized tests, see :mod:`cfn_core.bench.pytest_bench`) run the same matrix
and write the same Optimization Impact Report:

* :mod:`~cfn_core.bench.matrix` turns ``[bench]`` into cells;
* :mod:`~cfn_core.bench.runner` times one cell (repetitions of a fresh
  ``Coordinator``), :mod:`~cfn_core.bench.references` the reference rows and
  :mod:`~cfn_core.bench.resources` samples memory, fds and CPU meanwhile;
* :mod:`~cfn_core.bench.analysis` computes the ratios, targets, additivity and
  the decision gate; :mod:`~cfn_core.bench.render` writes JSON, Markdown and PNG;
* :mod:`~cfn_core.bench.compare` is the regression gate (``--compare``).

:mod:`~cfn_core.bench.whole_process` is separate: ``cfn run`` from start to exit, each
arm a fresh interpreter, against stand-alone stdlib scripts and the fork floor.

Nothing here is imported by agents or by ``cfn run``.
"""
