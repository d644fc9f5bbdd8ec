"""What watching costs: the snapshot ``cfn top`` reads, on a warm pooled session.

    python -m cfn_core.bench.snapshot [--agents 500] [--rounds 20] [--bus-root DIR]

Two figures from one pooled session of ``--agents`` agents (plugins pool, parallel):

- the cost of one snapshot (:func:`cfn_core.live.build_snapshot`, its JSON and its
  write to the bus), p50 and p90 of 200, and what four a second (the coordinator's
  pace) take of one core;
- warm rounds (one trivial task per agent) with the snapshot on and off
  (``cfn_core.live.SNAPSHOT_SECONDS`` 0.25 s / None), alternating, ``--rounds`` each:
  medians and their ratio (the target: on / off <= 1.05).

A benchmark, not a test: it asserts only that every round is ok.
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(agents: int, rounds: int, bus_root: str = "") -> dict:
    import orjson

    from cfn_core import Coordinator, config_from_dict
    from cfn_core import live

    config = config_from_dict({
        "plugins": ["pool", "parallel"], "workload": {"agents": agents}, "pool": {"size": agents},
        "run": {"max_agents": max(10_000, agents)}, "bus": {"root": bus_root},
    })
    saved = live.SNAPSHOT_SECONDS
    times: dict[str, list[float]] = {"on": [], "off": []}
    costs = []
    try:
        with Coordinator(config) as coord:
            ctx = coord.ctx
            if not coord.run().ok:  # warm: every agent has run a task
                raise SystemExit("snapshot bench: the warm-up round failed")
            for _ in range(200):
                t0 = time.perf_counter()
                ctx.bus.put_state(live.SNAPSHOT_KEY, orjson.dumps(live.build_snapshot(ctx, ctx.live, time.monotonic())))
                costs.append(time.perf_counter() - t0)
            for i in range(2 * rounds):
                arm = ("on", "off")[(i + i // 2) % 2]  # on off off on on off ...: neither arm always goes first
                live.SNAPSHOT_SECONDS = 0.25 if arm == "on" else None
                ctx.live.next_snapshot = 0.0
                t0 = time.perf_counter()
                result = coord.run()
                times[arm].append(time.perf_counter() - t0)
                if not result.ok:
                    raise SystemExit(f"snapshot bench: a round with the snapshot {arm} failed")
    finally:
        live.SNAPSHOT_SECONDS = saved
    costs.sort()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {
        "agents": agents, "snapshot_p50_ms": costs[len(costs) // 2] * 1e3, "snapshot_p90_ms": costs[len(costs) * 9 // 10] * 1e3,
        "round_on_ms": on * 1e3, "round_off_ms": off * 1e3, "ratio": on / off,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20, help="warm rounds per arm (default 20)")
    parser.add_argument("--bus-root", default="", help="directory for the run directory (default: cfn's)")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.rounds < 1:
        parser.error("--agents and --rounds must be at least 1")
    m = measure(args.agents, args.rounds, args.bus_root)
    print(f"snapshot of {m['agents']} agents: p50 {m['snapshot_p50_ms']:.2f} ms, p90 {m['snapshot_p90_ms']:.2f} ms; "
          f"four a second take {m['snapshot_p50_ms'] * 4 / 10:.2f}% of one core")
    print(f"warm round, median of {args.rounds}: snapshot on {m['round_on_ms']:.1f} ms, off {m['round_off_ms']:.1f} ms, "
          f"on/off {m['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
