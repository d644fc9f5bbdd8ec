"""A shard directory that becomes unusable sends its inboxes to the fallback location, not to loss."""

from __future__ import annotations

import os

from cfn_core import Coordinator

from cfn_shard.layout import shard_of


def test_unusable_shard_directory_falls_back_and_loses_nothing(make_config, no_leaks):
    config = make_config(
        plugins=("shard",),
        workload={"agents": 8, "rounds": 2, "topology": "mesh", "messages_per_agent": 10},
        shard={"count": 4, "strategy": "round-robin"},
    )
    with Coordinator(config) as coord:
        run_dir = coord.ctx.bus.run_dir
        # the session made shard-0..3; shard-2 is now taken by a plain file
        os.rmdir(run_dir / "shard-2")
        (run_dir / "shard-2").write_bytes(b"not a directory")
        result = coord.run()
        listing = sorted(os.listdir(run_dir / "shard-fallback"))
    assert result.ok and all(r.delivered == r.planned for r in result.rounds)
    in_two = [a for a in (f"agent-{i:04d}" for i in range(1, 9)) if shard_of(a, 4, "round-robin") == 2]
    assert in_two == ["agent-0003", "agent-0007"]
    # their inboxes and the coordinator's part for their shard moved to the fallback directory
    assert listing == ["_coordinator", "agent-0003", "agent-0007"]
    fig = result.plugin_figures["shard"]
    assert fig["fallbacks"] > 0
