"""batch + shard (+ pool + parallel when installed) together on a mesh: exact delivery accounting."""

from __future__ import annotations

import pytest
from cfn_core import Coordinator
from cfn_core.plugins import installed

COMBOS = [("batch", "shard"), ("parallel", "batch", "shard"), ("pool", "parallel", "batch", "shard")]


@pytest.mark.parametrize("plugins", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_mesh_with_plugins_together(make_config, no_leaks, plugins):
    missing = [p for p in plugins if p not in installed()]
    if missing:
        pytest.skip(f"not installed: {missing}")
    config = make_config(
        plugins=plugins,
        workload={"agents": 12, "rounds": 2, "topology": "mesh", "messages_per_agent": 40},
        shard={"count": 4},
        batch={"size": 8},
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok, [r.error for rnd in result.rounds for r in rnd.results.values() if not r.ok]
    for rnd in result.rounds:
        assert rnd.planned == 2 * 12 + 12 * 40
        assert rnd.delivered == rnd.planned
        assert rnd.dead_lettered == 0
    batch, shard = result.plugin_figures["batch"], result.plugin_figures["shard"]
    assert batch["messages"] >= 2 * 12 * 40  # every peer message went through a batch
    assert sum(shard["coordinator_inbox_per_shard"]) >= 2 * 12  # every result came in through a split part
    assert shard["fallbacks"] == 0
