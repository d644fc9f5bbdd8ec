"""Mesh coordination throughput with and without cfn-batch, side by side in one run.

    python plugins/cfn-batch/bench/bench_batch_mesh.py --shape 100x1000 --shape 500x200 [--with parallel] [--repeat 2]

A shape ``AxM`` is A agents each sending M peer messages to random other
agents (the kernel's mesh workload): A*M peer messages plus a task and a result
per agent, every one counted on arrival.  Throughput is delivered messages per
second of the distribute + execute + collect phases (spawning is not message
traffic; ``--with parallel`` only makes it quicker).  Arms alternate (baseline,
batch, baseline, batch...) so both see the same machine load; the best run of
each arm is reported.  ``inbox_depth`` is 0 because a mesh task settles its peer
messages only when it completes, so a receiver expecting more than the depth
would block its senders (see the docs page).
"""

from __future__ import annotations

import argparse
import sys

from cfn_core import Coordinator, config_from_dict


def one_run(agents, per_agent, plugins, root, timeout_ms, size):
    data = {
        "plugins": list(plugins),
        "workload": {"agents": agents, "topology": "mesh", "messages_per_agent": per_agent, "seed": 1},
        "bus": {"inbox_depth": 0},
        "run": {"spawn_timeout": 300.0, "max_agents": 100_000},
        "batch": {"timeout_ms": timeout_ms, "size": size},
    }
    if root:
        data["bus"]["root"] = root
    if "pool" in plugins:
        data["pool"] = {"size": agents}
    with Coordinator(config_from_dict(data)) as coord:
        result = coord.run()
    rnd = result.rounds[0]
    moving = rnd.phases["distribute"] + rnd.phases["execute"] + rnd.phases["collect"]
    return {
        "ok": result.ok,
        "planned": rnd.planned,
        "delivered": rnd.delivered,
        "seconds": moving,
        "rate": rnd.delivered / moving if moving else 0.0,
        "batch": result.plugin_figures.get("batch"),
        "p99": rnd.latency_p99,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", default=None, help="AGENTSxMESSAGES, e.g. 100x1000 (repeatable)")
    ap.add_argument("--with", dest="extra", action="append", default=[], help="plugin added to both arms (e.g. parallel)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--timeout-ms", type=int, default=100)
    ap.add_argument("--size", type=int, default=50)
    ap.add_argument("--root", default="")
    args = ap.parse_args(argv)
    shapes = args.shape or ["100x1000"]
    print(
        "| shape | peer msgs | arm | delivered | seconds (distribute+execute+collect) | msg/s | vs unbatched "
        "| msgs/batch | added latency p99 (bucket bound) / max | task latency p99 |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for shape in shapes:
        a, m = (int(x) for x in shape.lower().split("x"))
        arms = {"unbatched": tuple(args.extra), "batch": tuple(args.extra) + ("batch",)}
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for arm, plugins in arms.items():
                r = one_run(a, m, plugins, args.root, args.timeout_ms, args.size)
                if not r["ok"] or r["delivered"] != r["planned"]:
                    print(f"{shape} {arm}: delivered {r['delivered']} of {r['planned']} (ok={r['ok']})", file=sys.stderr)
                    return 1
                if arm not in best or r["rate"] > best[arm]["rate"]:
                    best[arm] = r
        base = best["unbatched"]["rate"]
        for arm, r in best.items():
            b = r["batch"] or {}
            lat = f"{b.get('added_latency_p99_ms_at_most')} ms / {b.get('added_latency_max_ms')} ms" if b else ""
            print(
                f"| {shape} | {a * m:,} | {arm}{'+' + '+'.join(args.extra) if args.extra else ''} | {r['delivered']:,}/{r['planned']:,} | "
                f"{r['seconds']:.2f} | {r['rate']:,.0f} | {r['rate'] / base:.1f}x | {b.get('messages_per_batch', '')} | {lat} "
                f"| {r['p99'] * 1000:.0f} ms |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
