"""cfn-batch in real coordinations: exact delivery, figures, metrics, settings."""

from __future__ import annotations

import pytest
from cfn_core import ConfigError, Coordinator, load_config


def test_mesh_round_with_batching_delivers_everything(make_config, no_leaks):
    config = make_config(plugins=("batch",), workload={"agents": 8, "topology": "mesh", "messages_per_agent": 60})
    with Coordinator(config) as coord:
        result = coord.run()
        registry = coord.ctx.metrics.registry
        batches = registry.get_sample_value("cfn_batch_messages_per_batch_count")
        explicit = registry.get_sample_value("cfn_batch_flushes_total", {"reason": "explicit"})
    rnd = result.rounds[0]
    assert result.ok
    assert rnd.delivered == rnd.planned == 2 * 8 + 8 * 60
    fig = result.plugin_figures["batch"]
    assert fig["agent_processes"] == 8
    # exact, from the figures agents leave as they exit: per agent ready + 60 peers + result,
    # and the coordinator's 8 tasks and 8 stops; fewer writes than messages
    assert fig["messages"] == 8 * (1 + 60 + 1) + 8 + 8
    assert fig["batches"] < fig["messages"]
    assert batches == fig["batches"] and explicit == fig["flushes"]["explicit"]
    assert fig["flusher_deaths"] == 0 and fig["unbatched_messages"] == 0


def test_nothing_waits_for_the_timer_when_processes_sleep_or_exit(make_config, no_leaks):
    # a timeout no test would wait for: only the kernel's explicit and shutdown flushes can deliver
    config = make_config(
        plugins=("batch",),
        workload={"agents": 4, "rounds": 2, "topology": "mesh", "messages_per_agent": 5},
        batch={"size": 1000, "max_size": 1000, "timeout_ms": 600_000},
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok and all(r.delivered == r.planned for r in result.rounds)
    assert result.plugin_figures["batch"]["flushes"]["timeout"] == 0


def test_max_size_below_size_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"\[batch\] max_size = 10 .* size = 50"):
        Coordinator(make_config(plugins=("batch",), batch={"max_size": 10})).open()


def test_plan_environment_names(tmp_path):
    cfg = load_config(
        None,
        discover=False,
        env={"CFN_BATCH_SIZE": "20", "CFN_BATCH_TIMEOUT": "7", "CFN_BATCH_MAX_SIZE": "80", "CFN_ENABLE_BATCHING": "1"},
    )
    s = cfg.section("batch")
    assert (s.size, s.timeout_ms, s.max_size) == (20, 7, 80)
    assert "batch" in cfg.enabled()


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"CFN_BATCH_TIMEOUT.*timeout_ms.*from 1 to 600000"):
        load_config(discover=False, env={"CFN_BATCH_TIMEOUT": "0"})


def test_agents_read_through_the_kernels_direct_path(make_config):
    """Batching wraps no read: agents and the coordinator read with the baseline's function
    (agents' batch figures reach the coordinator through the kernel, ctx.agent_counters)."""
    from cfn_core.builtin import cfn_read as baseline_read
    from cfn_core.plugins import direct_caller, make_plugin_manager

    config = make_config(plugins=("batch",))
    agent_pm = make_plugin_manager(config)  # what an agent builds
    assert direct_caller(agent_pm, "cfn_read") is baseline_read
    with Coordinator(config) as coord:
        assert direct_caller(coord.pm, "cfn_read") is baseline_read