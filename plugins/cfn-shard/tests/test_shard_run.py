"""cfn-shard in real coordinations: exact delivery, nothing stranded, figures and metrics."""

from __future__ import annotations

import os

import pytest
from cfn_core import COORDINATOR_ID, ConfigError, Coordinator, load_config


def settled_everywhere(ctx) -> list[str]:
    """Inbox files with records nobody settled (must be empty once a round is over)."""
    left = []
    run_dir = ctx.bus.run_dir
    for d in sorted(p for p in os.listdir(run_dir) if p.startswith("shard-")):
        for name in os.listdir(run_dir / d):
            if name == COORDINATOR_ID:
                inbox = f"{COORDINATOR_ID}.fb" if d == "shard-fallback" else f"{COORDINATOR_ID}.s{d.split('-')[1]}"
            else:
                inbox = f"{name}.fb" if d == "shard-fallback" else name
            if ctx.bus.unread_bytes(inbox, f"{d}/{name}"):
                left.append(f"{d}/{name}")
    return left


@pytest.mark.parametrize("strategy", ["hash", "round-robin", "random"])
def test_mesh_round_delivers_everything(make_config, no_leaks, strategy):
    config = make_config(
        plugins=("shard",),
        workload={"agents": 8, "topology": "mesh", "messages_per_agent": 30},
        shard={"count": 3, "strategy": strategy},
    )
    with Coordinator(config) as coord:
        result = coord.run()
        assert settled_everywhere(coord.ctx) == []
        registry = coord.ctx.metrics.registry
        read = sum(registry.get_sample_value("cfn_shard_messages_total", {"shard": str(k)}) for k in range(3))
    rnd = result.rounds[0]
    assert result.ok and rnd.delivered == rnd.planned == 2 * 8 + 8 * 30
    fig = result.plugin_figures["shard"]
    assert sum(fig["agents_per_shard"]) == 8
    assert sum(fig["coordinator_inbox_per_shard"]) == 16  # 8 ready + 8 results, spread over the shards
    assert read == sum(fig["messages_per_shard"])
    assert fig["lock_wait_ms_total"] >= 0 and fig["fallbacks"] == 0  # contention itself is not deterministic


def test_changing_the_count_between_runs_is_safe(make_config, no_leaks):
    for count in (5, 2, 1, 7):
        config = make_config(plugins=("shard",), workload={"agents": 5, "rounds": 2}, shard={"count": count})
        with Coordinator(config) as coord:
            result = coord.run()
            assert settled_everywhere(coord.ctx) == []
            assert sorted(p for p in os.listdir(coord.ctx.bus.run_dir) if p.startswith("shard-")) == [
                f"shard-{k}" for k in range(count)
            ]
        assert result.ok and all(r.delivered == r.planned for r in result.rounds)


def test_plan_environment_names():
    cfg = load_config(discover=False, env={"CFN_SHARD_COUNT": "16", "CFN_SHARD_STRATEGY": "round-robin", "CFN_ENABLE_SHARDING": "yes"})
    assert (cfg.section("shard").count, cfg.section("shard").strategy) == (16, "round-robin")
    assert "shard" in cfg.enabled()


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ConfigError, match=r"CFN_SHARD_STRATEGY.*'hsah'.*one of hash, round-robin, random.*did you mean 'hash'"):
        load_config(discover=False, env={"CFN_SHARD_STRATEGY": "hsah"})
