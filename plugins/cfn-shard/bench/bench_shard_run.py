"""Shard counts in real coordinations: lock wait, its share of coordination time, balance, throughput.

    python plugins/cfn-shard/bench/bench_shard_run.py --agents 500 --messages 20 --counts 1,4,8,16,32 [--with pool --with parallel]

One session per shard count (``count = 1`` is one directory and one
coordinator inbox, i.e. the baseline layout measured with the same
instrumentation).  Every arm runs the same mesh: each agent sends
``--messages`` peer messages; delivery must be exact.  Lock wait is the sum of
all processes' flock waits (``ShmBus.lock_wait``); its share is that sum
divided by (round seconds x processes), the average fraction of the
coordination a process spent waiting for inbox locks.
"""

from __future__ import annotations

import argparse
import sys

from cfn_core import Coordinator, config_from_dict


def one(count: int, args) -> dict:
    data = {
        "plugins": list(args.extra) + ["shard"],
        "workload": {"agents": args.agents, "topology": "mesh", "messages_per_agent": args.messages, "seed": 1},
        "bus": {"inbox_depth": 0},
        "run": {"spawn_timeout": 600.0, "max_agents": 100_000},
        "shard": {"count": count, "strategy": args.strategy},
    }
    if "pool" in args.extra:
        data["pool"] = {"size": args.agents}
    with Coordinator(config_from_dict(data)) as coord:
        result = coord.run()
    rnd = result.rounds[0]
    if not result.ok or rnd.delivered != rnd.planned:
        raise SystemExit(f"count {count}: delivered {rnd.delivered} of {rnd.planned}")
    fig = result.plugin_figures["shard"]
    moving = rnd.phases["distribute"] + rnd.phases["execute"] + rnd.phases["collect"]
    wait_s = fig["lock_wait_ms_total"] / 1000
    return {
        "count": count,
        "wait_s": wait_s,
        "share": wait_s / (rnd.seconds * (args.agents + 1)),
        "round_s": rnd.seconds,
        "moving_s": moving,
        "rate": rnd.delivered / moving,
        "balance": fig["balance_messages"],
        "balance_agents": fig["balance_agents"],
        "fallbacks": fig["fallbacks"],
    }


def _ratio(base: float, value: float) -> str:
    return f"{base / value:.1f}x" if value > 0 else ("no wait" if base > 0 else "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--counts", default="1,4,8,16,32")
    ap.add_argument("--strategy", default="hash")
    ap.add_argument("--with", dest="extra", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    best: dict[int, dict] = {}
    for _ in range(args.repeat):
        for count in counts:
            r = one(count, args)
            if count not in best or r["wait_s"] < best[count]["wait_s"]:
                best[count] = r
    base = best[counts[0]]
    print(
        f"{args.agents} agents, mesh of {args.messages} peer messages each, plugins {'+'.join(args.extra + ['shard'])}, "
        f"strategy {args.strategy}; all delivered\n"
    )
    print(
        "| shards | lock wait, all processes (s) | vs 1 dir | lock wait share of coordination | round (s) "
        "| msg/s (distribute+execute+collect) | balance msgs (max/mean) | balance agents |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in counts:
        r = best[count]
        print(
            f"| {count} | {r['wait_s']:.3f} | {_ratio(base['wait_s'], r['wait_s'])} | {r['share']:.2%} | {r['round_s']:.1f} | "
            f"{r['rate']:,.0f} | {r['balance']} | {r['balance_agents']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
