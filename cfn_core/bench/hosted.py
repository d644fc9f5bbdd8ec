"""Hosted agents against process agents, side by side in one run (docs/HOSTING.md "Measured").

    python -m cfn_core.bench.hosted                       # the default sizes
    python -m cfn_core.bench.hosted --agents 10000 --process-agents 500 --repeat 3

Four measurements, arms alternating within each repetition so that the machine's load
falls on both alike; what is printed first is the ratio:

* ``cold``: a whole fresh ``python`` process that opens a coordinator, runs one task
  per agent (star) and closes, timed from outside: N hosted agents next to M forked
  process agents (cfn-pool's zygote); per-agent seconds and their ratio;
* ``sleep``: every hosted agent awaits ``asyncio.sleep(1)`` (a fake LLM call) then
  messages a peer: the round's seconds and the overhead over the 1 s;
* ``memory``: the hosts' resident memory (USS) with N agents over that with a few, per agent;
* ``rtt``: request/reply round trips, p50/p99, between two hosted agents in one host,
  across two hosts, and between two process agents;
* ``scale`` (only when asked for, ``--only scale --agents 100000``): one fresh ``python``
  process runs a round of one task per agent with N hosted agents; its phases, delivery,
  the hosts' USS per agent and the coordinator's peak RSS.

The agents' handlers are in this module (:class:`BenchAgent`, :class:`SyncBenchAgent`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

#: what a cold child process runs (argv: kind, n, bus root)
_COLD = r"""
import sys, time
from cfn_core import Coordinator
from cfn_core.config import config_from_dict
kind, n, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "hosted":
    data = {"workload": {"agents": n, "handler": "cfn_core.bench.hosted:echo", "host": "async"}}
else:
    data = {"workload": {"agents": n, "handler": "cfn_core.handlers:echo"}, "plugins": ["pool"], "pool": {"size": n}}
data["bus"] = {"root": root}
with Coordinator(config_from_dict(data, source="bench")) as coord:
    result = coord.run(list(range(n)))
ok = result.ok and result.delivery_rate == 1.0
print("OK" if ok else "FAILED", result.delivery_rate)
"""


async def echo(payload, agent):
    return payload


class BenchAgent:
    """Hosted: ``sleep`` (fake LLM call then a message to a peer) and ``rtt`` (round trips)."""

    async def on_task(self, payload, agent):
        op = payload.get("op")
        if op == "sleep":
            await asyncio.sleep(payload["seconds"])
            agent.send(payload["to"], {"done": agent.id})
            return True
        if op == "rtt":
            out = []
            for i in range(payload["n"]):
                t0 = time.perf_counter()
                await agent.request(payload["to"], i, timeout=60)
                out.append(time.perf_counter() - t0)
            return out
        return None

    async def on_message(self, message, agent):
        if message.wants_reply:
            agent.reply(message, message.body)


class SyncBenchAgent:
    """The same round trips for process agents."""

    def on_task(self, payload, agent):
        out = []
        for i in range(payload["n"]):
            t0 = time.perf_counter()
            agent.request(payload["to"], i, timeout=60)
            out.append(time.perf_counter() - t0)
        return out

    def on_message(self, message, agent):
        if message.wants_reply:
            agent.reply(message, message.body)


def _root(root: str | None) -> str:
    return root or ("/dev/shm" if os.path.isdir("/dev/shm") else "")


def cold(kind: str, n: int, root: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _COLD, kind, str(n), root], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not proc.stdout.startswith("OK"):
        raise RuntimeError(f"cold {kind} x{n} failed: {proc.stdout[-500:]} {proc.stderr[-2000:]}")
    return seconds


#: what the scale arm's child process runs (argv: n, hosts, bus root); prints one JSON line
_SCALE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import psutil
from cfn_core import Coordinator
from cfn_core.config import config_from_dict
n, hosts, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = {"workload": {"agents": n, "handler": "cfn_core.bench.hosted:echo", "host": "async", "hosts": hosts, "timeout": 600},
        "run": {"max_agents": max(n, 10)}, "bus": {"root": root}}  # [run] spawn_timeout stays its default, 30 s
with Coordinator(config_from_dict(data, source="bench")) as coord:
    t1 = time.perf_counter()
    ready = coord.ctx.hook.cfn_acquire_agents(ctx=coord.ctx, count=n)
    t2 = time.perf_counter()
    uss = sum(psutil.Process(h.pid).memory_full_info().uss for h in coord.ctx.state["cfn.hosting"].hosts.values() if h.alive)
    result = coord.run(list(range(n)))
    t3 = time.perf_counter()
t4 = time.perf_counter()
print(json.dumps({"agents": n, "ready": len(ready), "ok": result.ok, "delivery": result.delivery_rate,
                  "open": t1 - t0, "spawn": t2 - t1, "round": t3 - t2, "close": t4 - t3, "total": t4 - t0,
                  "hosts_uss_bytes": uss, "coordinator_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def scale(n: int, hosts: int, root: str) -> dict:
    """One round of ``n`` hosted agents in a fresh process: its phases and memory (see ``_SCALE``)."""
    proc = subprocess.run([sys.executable, "-c", _SCALE, str(n), str(hosts), root], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"scale x{n} failed: {proc.stdout[-500:]} {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _config(data: dict, root: str):
    from cfn_core.config import config_from_dict

    data.setdefault("bus", {})["root"] = root
    agents = data["workload"].get("agents", 0)
    if agents > 10_000:  # [run] max_agents' default guards against a typo; here it is meant
        data.setdefault("run", {})["max_agents"] = agents
    return config_from_dict(data, source="bench")


def sleep_round(n: int, hosts: int, seconds: float, root: str) -> float:
    from cfn_core import Coordinator

    config = _config({"workload": {"agents": n, "handler": "cfn_core.bench.hosted:BenchAgent", "host": "async",
                                   "hosts": hosts, "timeout": 600}}, root)
    with Coordinator(config) as coord:
        coord.ctx.hook.cfn_acquire_agents(ctx=coord.ctx, count=n)  # started before the round is timed
        tasks = [{"op": "sleep", "seconds": seconds, "to": f"agent-{(i + 1) % n + 1:04d}"} for i in range(n)]
        t0 = time.perf_counter()
        result = coord.run(tasks)
        took = time.perf_counter() - t0
    if not result.ok or result.delivery_rate != 1.0:
        raise RuntimeError(f"sleep round failed: delivery {result.delivery_rate}")
    phases = result.rounds[0].phases
    print(f"  sleep round phases: {', '.join(f'{k} {v:.2f}s' for k, v in phases.items())}")
    return took


def memory_per_agent(n: int, hosts: int, root: str, base: int = 10) -> float:
    """Bytes of host memory (USS, summed over hosts) per hosted agent, from N agents over ``base`` agents."""
    import psutil

    from cfn_core import Coordinator

    def uss(count: int) -> int:
        config = _config({"workload": {"agents": count, "handler": "cfn_core.bench.hosted:BenchAgent", "host": "async",
                                       "hosts": hosts}}, root)
        with Coordinator(config) as coord:
            ready = coord.ctx.hook.cfn_acquire_agents(ctx=coord.ctx, count=count)
            assert len(ready) == count, f"{len(ready)} of {count} hosted agents ready"
            pids = {h.pid for h in coord.ctx.state["cfn.hosting"].hosts.values() if h.alive}
            return sum(psutil.Process(p).memory_full_info().uss for p in pids)

    return (uss(n) - uss(base)) / (n - base)


def rtt(arm: str, rounds: int, root: str) -> list[float]:
    from cfn_core import Coordinator

    if arm == "process":
        data = {"workload": {"agents": 2, "handler": "cfn_core.bench.hosted:SyncBenchAgent"}}
    else:  # hosted, one host (agents 1 and 2 together) or two (agent 1 in host 1, agent 2 in host 2)
        data = {"workload": {"agents": 2, "handler": "cfn_core.bench.hosted:BenchAgent", "host": "async",
                             "hosts": 1 if arm == "hosted-same-host" else 2}}
    with Coordinator(_config(data, root)) as coord:
        from cfn_core import Task

        payload = {"op": "rtt", "n": rounds, "to": "agent-0002"}
        result = coord.run([Task(id="rtt", payload=payload if arm != "process" else {"n": rounds, "to": "agent-0002"})])
    if not result.ok:
        raise RuntimeError(f"rtt {arm}: {[r.error for r in result.results.values()]}")
    return result.results["rtt"].value


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.hosted", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="hosted agents (cold, sleep, memory)")
    parser.add_argument("--process-agents", type=int, default=500, help="forked process agents in the cold arm")
    parser.add_argument("--hosts", type=int, default=0, help="host processes (0: one per core)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--sleep", type=float, default=1.0, help="the fake LLM call's seconds")
    parser.add_argument("--rtt", type=int, default=500, help="round trips per rtt arm")
    parser.add_argument("--only", default="cold,sleep,memory,rtt", help="which measurements (comma separated)")
    parser.add_argument("--root", default=None, help="bus root (default /dev/shm)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    from cfn_core.roles import _hosts

    root, only = _root(args.root), set(args.only.split(","))
    hosts = _hosts(args.hosts)
    out: dict = {"agents": args.agents, "process_agents": args.process_agents, "hosts": hosts, "repeat": args.repeat,
                 "load_average": os.getloadavg()}
    print(f"hosted agents: {args.agents} in {hosts} host(s); process agents: {args.process_agents} (pool, forked); "
          f"{args.repeat} alternating repetition(s); load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    if "cold" in only:
        runs: dict[str, list[float]] = {"hosted": [], "process": []}
        for _ in range(args.repeat):
            runs["hosted"].append(cold("hosted", args.agents, root))
            runs["process"].append(cold("process", args.process_agents, root))
        h, p = statistics.median(runs["hosted"]), statistics.median(runs["process"])
        per_h, per_p = h / args.agents, p / args.process_agents
        out["cold"] = {"hosted_seconds": runs["hosted"], "process_seconds": runs["process"]}
        print(f"cold whole process, one task each: hosted x{args.agents} {h:.2f} s median ({per_h * 1e6:.0f} us/agent); "
              f"process x{args.process_agents} {p:.2f} s ({per_p * 1e6:.0f} us/agent); "
              f"per agent, process / hosted = {per_p / per_h:.1f}x")
    if "sleep" in only:
        took = [sleep_round(args.agents, hosts, args.sleep, root) for _ in range(args.repeat)]
        m = statistics.median(took)
        out["sleep"] = {"seconds": took, "sleep": args.sleep}
        print(f"{args.agents} agents each await a {args.sleep:g} s call then message a peer: round {m:.2f} s median "
              f"(overhead {m - args.sleep:.2f} s; serial would be {args.agents * args.sleep / hosts:.0f} s per core)")
    if "memory" in only:
        per = memory_per_agent(args.agents, hosts, root)
        out["memory_bytes_per_agent"] = per
        print(f"memory per hosted agent (hosts' USS, {args.agents} agents over 10): {per / 1024:.1f} KiB")
    if "rtt" in only:
        arms = ["hosted-same-host", "hosted-two-hosts", "process"]
        lat: dict[str, list[float]] = {a: [] for a in arms}
        for _ in range(args.repeat):
            for arm in arms:
                lat[arm] += rtt(arm, args.rtt, root)
        base = _pct(lat["process"], 0.5)
        out["rtt"] = {a: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "n": len(v)} for a, v in lat.items()}
        for arm in arms:
            p50, p99 = _pct(lat[arm], 0.5), _pct(lat[arm], 0.99)
            print(f"request/reply {arm:17s} p50 {p50 * 1e6:7.0f} us  p99 {p99 * 1e6:7.0f} us  "
                  f"p50 vs process {p50 / base:.2f}x")
    if "scale" in only:
        s = out["scale"] = scale(args.agents, hosts, root)
        print(f"scale: {s['agents']} hosted agents in {hosts} host(s), one task each: delivery {s['delivery']:g}, "
              f"ok {s['ok']}; total {s['total']:.1f} s (open {s['open']:.2f}, spawn {s['spawn']:.1f}, round "
              f"{s['round']:.1f}, close {s['close']:.1f}); hosts' USS {s['hosts_uss_bytes'] / s['agents'] / 1024:.1f} "
              f"KiB per agent; coordinator peak RSS {s['coordinator_max_rss_bytes'] / 2**20:.0f} MiB")
    out["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
