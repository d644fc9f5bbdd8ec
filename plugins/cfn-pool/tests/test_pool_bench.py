"""cfn-pool's figures as bench-marked tests (``pytest -m bench plugins/cfn-pool``): ratios, never wall times.

Each test measures the pool and its comparison in the same run and asserts
what must hold on any machine: the zygote fills a pool faster and with less
memory than fresh interpreters, warm rounds cost less than the cold one, a
steady workload is served from the pool.  The absolute figures are attached
to the test report (``record_property``) and printed with ``-s``.
"""

from __future__ import annotations

import statistics

import psutil
import pytest

from cfn_core import Coordinator

pytestmark = pytest.mark.bench


def _open_figures(make_config, **pool):
    config = make_config(plugins=["pool", "parallel"], workload={"agents": 1}, pool=pool)
    with Coordinator(config) as coord:
        return coord.run().plugin_figures["pool"]


def test_zygote_fills_a_pool_of_50_faster_than_fresh_interpreters(make_config, record_property, no_leaks):
    zygote = _open_figures(make_config, size=50)
    fresh = _open_figures(make_config, size=50, zygote=False)
    ratio = fresh["init_seconds"] / zygote["init_seconds"]
    record_property("init_50_zygote_s", zygote["init_seconds"])
    record_property("init_50_fresh_s", fresh["init_seconds"])
    print(f"pool of 50: zygote {zygote['init_seconds']:.3f}s, fresh interpreters {fresh['init_seconds']:.3f}s, x{ratio:.1f}")
    assert zygote["init_ready"] == fresh["init_ready"] == 50
    assert ratio > 2


def test_warm_rounds_cost_less_than_the_cold_one(make_config, record_property, no_leaks):
    config = make_config(plugins=["pool", "parallel"], workload={"agents": 100, "rounds": 5}, pool={"size": 0})
    with Coordinator(config) as coord:
        result = coord.run()
    cold, warm = result.rounds[0].seconds, statistics.median(r.seconds for r in result.rounds[1:])
    record_property("cold_100_s", cold)
    record_property("warm_100_s", warm)
    print(f"100 agents: cold round {cold:.3f}s, warm round {warm:.3f}s")
    assert result.ok and warm < cold
    assert all(r.phases["spawn"] < result.rounds[0].phases["spawn"] for r in result.rounds[1:])


def test_steady_workload_is_served_from_the_pool(make_config, record_property, no_leaks):
    config = make_config(plugins=["pool", "parallel"], workload={"agents": 30, "rounds": 20}, pool={"size": 20})
    with Coordinator(config) as coord:
        figures = coord.run().plugin_figures["pool"]
    record_property("hit_rate", figures["hit_rate"])
    record_property("assign_p99_ms", figures["assign_p99_ms"])
    print(f"hit rate {figures['hit_rate']:.3f}, assignment p99 {figures['assign_p99_ms']:.4f} ms")
    assert figures["hit_rate"] >= 0.95


def test_a_20_agent_pool_costs_less_memory_with_the_zygote(make_config, record_property, no_leaks):
    pss = {}
    for zygote in (True, False):
        config = make_config(plugins=["pool"], workload={"agents": 1}, pool={"size": 20, "zygote": zygote})
        with Coordinator(config) as coord:
            procs = psutil.Process().children(recursive=True)
            pss[zygote] = sum(p.memory_full_info().pss for p in procs) / 2**20
    record_property("pss_20_zygote_mb", pss[True])
    record_property("pss_20_fresh_mb", pss[False])
    print(f"20-agent pool PSS: zygote {pss[True]:.1f} MB (zygote and forkers included), fresh {pss[False]:.1f} MB")
    assert pss[True] < pss[False] / 2
