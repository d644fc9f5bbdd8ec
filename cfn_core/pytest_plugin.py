"""cfn's pytest plugin (entry point ``pytest11``): fixtures and the ``bench`` marker.

The benchmark matrix (``pytest -m bench``) is added here too.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a cfn benchmark matrix cell (run with -m bench)")


@pytest.fixture
def cfn_config(tmp_path):
    """A factory for validated configs: ``cfn_config(workload={"agents": 5}, plugins=["pool"])``."""
    from cfn_core.config import config_from_dict

    def make(plugins=(), **tables):
        data = {"plugins": list(plugins)}
        data.update(tables)
        return config_from_dict(data)

    return make
