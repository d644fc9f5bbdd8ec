"""cfn's pytest plugin (entry point ``pytest11``): test fixtures and the benchmark matrix.

Fixtures (``make_config``, ``bus_root``, ``no_leaks``) come from :mod:`cfn_core.testing`.
"""

from __future__ import annotations

from cfn_core.testing import bus_root, make_config, no_leaks  # noqa: F401  (fixtures)


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a cfn benchmark matrix cell (run with -m bench)")
