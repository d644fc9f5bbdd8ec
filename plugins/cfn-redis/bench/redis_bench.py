"""Benchmarks of the Redis bus: ratios measured side by side in one run, never absolute targets.

::

    python plugins/cfn-redis/bench/redis_bench.py ratio --agents 500 --repeat 3
    python plugins/cfn-redis/bench/redis_bench.py throughput --messages 20000 --sinks 20
    python plugins/cfn-redis/bench/redis_bench.py hosts --agents 2000 --hosts 2

``ratio``: the same coordination on the /dev/shm bus and on Redis, alternated
(shm, redis, shm, redis...), median seconds of each and redis/shm.
``throughput``: messages/s through the relay (outbox -> XADD -> XREADGROUP ->
spool; the relay is stopped while the outbox is filled, then timed until the
last message arrived) with pipelines of ``[redis] pipeline`` commands and with
one command per round trip.  ``hosts``: N agents all on ``--hosts`` separate ``cfn agent``
processes (the coordinator runs none itself), delivery and time.
Redis: ``--url`` or CFN_REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def _config(plugins, agents, url, root, **tables):
    from cfn_core.config import config_from_dict

    data = {"plugins": list(plugins), "workload": {"agents": agents}, "bus": {"root": root}, "run": {"spawn_timeout": 900.0}}
    data["redis"] = {"url": url, **tables.pop("redis", {})}
    for k, v in tables.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def _spawners():
    from cfn_core.plugins import installed

    return tuple(p for p in ("pool", "parallel") if p in installed())


def _coordinate(config):
    """One coordination; also its wall time from opening the session to closing it."""
    from cfn_core import Coordinator

    t0 = time.perf_counter()
    with Coordinator(config) as coord:
        result = coord.run()
    return result, time.perf_counter() - t0


def cmd_ratio(args) -> dict:
    extra = tuple(p for p in args.plugins.split(",") if p) if args.plugins is not None else _spawners()
    runs = {"shm": [], "redis": []}
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="cfnbench-") as root:
        for i in range(args.repeat):
            for bus in ("shm", "redis"):
                plugins = extra + (("redis",) if bus == "redis" else ())
                result, wall = _coordinate(_config(plugins, args.agents, args.url, root))
                phases = result.to_dict()["phases"]
                runs[bus].append({"seconds": result.seconds, "wall": wall, "delivery": result.delivery_rate, "phases": phases})
                print(f"  {bus:5} run {i + 1}: wall {wall:.2f}s (run {result.seconds:.2f}s) delivery {result.delivery_rate} "
                      + " ".join(f"{k} {v:.2f}" for k, v in phases.items()), file=sys.stderr)
    med = {bus: statistics.median(r["wall"] for r in rs) for bus, rs in runs.items()}
    med_run = {bus: statistics.median(r["seconds"] for r in rs) for bus, rs in runs.items()}
    out = {
        "agents": args.agents,
        "plugins": list(extra),
        "median_wall_seconds": med,
        "median_run_seconds": med_run,
        "ratio_redis_over_shm": med["redis"] / med["shm"],
        "ratio_run_redis_over_shm": med_run["redis"] / med_run["shm"],
        "delivery": {bus: min(r["delivery"] for r in rs) for bus, rs in runs.items()},
        "runs": runs,
    }
    print(f"{args.agents} agents ({'+'.join(extra) or 'baseline'} spawn), wall time open..close: shm {med['shm']:.2f}s, "
          f"redis {med['redis']:.2f}s, ratio {out['ratio_redis_over_shm']:.2f}x (run only: {out['ratio_run_redis_over_shm']:.2f}x); "
          f"delivery shm {out['delivery']['shm']} redis {out['delivery']['redis']}")
    return out


def _throughput_once(url, root, messages, sinks, pipeline) -> float:
    from cfn_core import COORDINATOR_ID
    from cfn_redis.bus import HubBus, LocalBus

    config = _config(("redis",), 1, url, root, redis={"pipeline": pipeline})
    hub = HubBus.open(config)
    reader = None
    sel = selectors.DefaultSelector()
    try:
        hub.listen(COORDINATOR_ID)
        reader = LocalBus.attach(hub.run_ref)
        names = [f"sink-{i:03d}" for i in range(sinks)]
        for name in names:
            reader.listen(name)
            reader.read(name, f"inbox/{name}")
            sel.register(reader.wake_fd(name), selectors.EVENT_READ, name)
        record = b'{"id":"x","src":"bench","dst":"sink","kind":"peer","round":1,"task":null,"body":"' + b"p" * 64 + b'"}\n'

        def receive(count):
            got = 0
            while got < count:
                for name in names:
                    batch = reader.read(name, f"inbox/{name}")
                    if batch:
                        got += len(batch)
                        reader.ack(name, [r for _, r in batch])
                if got < count:
                    for key, _ in sel.select(1.0):
                        reader.drain_wakeups(key.data)

        for name in names:  # warm up: every sink registered and its stream created
            hub.deliver(name, f"inbox/{name}", [record])
        receive(sinks)
        # the relay is stopped while the outbox fills, so what is timed is the relay alone
        # (outbox -> XADD -> XREADGROUP -> spool), not this process writing the outbox
        hub.relay.send_signal(signal.SIGSTOP)
        try:
            for i in range(messages):
                name = names[i % sinks]
                hub.deliver(name, f"inbox/{name}", [record])
        finally:
            hub.relay.send_signal(signal.SIGCONT)
        t0 = time.perf_counter()
        receive(messages)
        return messages / (time.perf_counter() - t0)
    finally:
        sel.close()
        if reader is not None:
            reader.close()
        hub.destroy()


def cmd_throughput(args) -> dict:
    rates = {"pipelined": [], "unpipelined": []}
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="cfnbench-") as root:
        for i in range(args.repeat):
            for label, size in (("pipelined", args.pipeline), ("unpipelined", 1)):
                rate = _throughput_once(args.url, root, args.messages, args.sinks, size)
                rates[label].append(rate)
                print(f"  {label:11} run {i + 1}: {rate:,.0f} msg/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"messages": args.messages, "sinks": args.sinks, "pipeline": args.pipeline, "median_msgs_per_s": med,
           "ratio_pipelined_over_unpipelined": med["pipelined"] / med["unpipelined"], "runs": rates}
    print(f"{args.messages} messages to {args.sinks} inboxes through the relay: pipelined ({args.pipeline}) "
          f"{med['pipelined']:,.0f} msg/s, one command per round trip {med['unpipelined']:,.0f} msg/s, "
          f"ratio {out['ratio_pipelined_over_unpipelined']:.1f}x")
    return out


def cmd_hosts(args) -> dict:
    from cfn_core import Coordinator

    per_host = -(-args.agents // args.hosts)
    extra = tuple(p for p in args.plugins.split(",") if p) if args.plugins is not None else tuple(
        p for p in ("parallel",) if p in _spawners())
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="cfnbench-") as root:
        tables = {"parallel": {"timeout": 300.0}} if "parallel" in extra else {}  # fresh interpreters on a busy machine
        if "pool" in extra:
            tables["pool"] = {"size": 0}  # nothing pre-spawned on this machine: every agent on the hosts
        config = _config(("redis",) + extra, args.agents, args.url, root,
                         redis={"local_agents": 0, "wait_hosts": args.hosts}, run={"spawn_timeout": 900.0}, **tables)
        procs = []
        coord = Coordinator(config)
        try:
            coord.open()
            run = coord.ctx.bus.run_id
            for _ in range(args.hosts):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "cfn_core", "agent", "--bus", args.url, "--run", run,
                     "--agents", str(per_host), "--root", root, "--wait", "60"], stdin=subprocess.DEVNULL))
            t0 = time.perf_counter()
            result = coord.run()
            seconds = time.perf_counter() - t0
            placed = {}
            for h in coord.ctx.agents.values():
                placed[h.info.get("host")] = placed.get(h.info.get("host"), 0) + 1
        finally:
            coord.close()
            codes = [p.wait(120) for p in procs]
    out = {"agents": args.agents, "hosts": args.hosts, "plugins": list(extra), "seconds": seconds,
           "delivery": result.delivery_rate, "ok": result.ok, "agents_per_host": placed, "host_exit_codes": codes,
           "phases": result.to_dict()["phases"], "figures": result.plugin_figures.get("redis")}
    print(f"{args.agents} agents on {args.hosts} `cfn agent` processes: {seconds:.1f}s, delivery {result.delivery_rate}, "
          f"per host {sorted(placed.values())}, exit codes {codes}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CFN_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ratio")
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--plugins", help="spawn plugins on both buses (default: pool,parallel when installed; '' for the baseline)")
    p.set_defaults(func=cmd_ratio)
    p = sub.add_parser("throughput")
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sinks", type=int, default=20)
    p.add_argument("--pipeline", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(func=cmd_throughput)
    p = sub.add_parser("hosts")
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--plugins", help="plugins besides redis (default: parallel when installed; with pool the hosts fork agents from a zygote)")
    p.set_defaults(func=cmd_hosts)
    args = parser.parse_args(argv)
    out = args.func(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
