"""Request/reply round trip between two agents, against a ``multiprocessing.Pipe`` round trip.

``python -m cfn_core.bench.talk [--n 2000] [--plugins redis]``: both measured in the same
run, on the same machine; prints p50/p99 of each and their ratio (the figures in
docs/BENCHMARKS.md "Agents that talk").  Nothing else imports this module except the
agents it starts (``handler = "cfn_core.bench.talk:PingAgent"``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time


class PingAgent:
    """The task times ``n`` requests to the other agent; the other answers in ``on_message``."""

    def on_task(self, n, agent):
        peer = agent.peers()[0]
        agent.request(peer, 0, timeout=60)  # warm-up: the peer's first message
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            agent.request(peer, i, timeout=60)
            out.append(time.perf_counter() - t0)
        return out

    def on_message(self, message, agent):
        agent.reply(message, message.body)


def _echo(conn) -> None:
    while True:
        x = conn.recv()
        if x is None:
            return
        conn.send(x)


def pipe_round_trips(n: int) -> list[float]:
    a, b = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_echo, args=(b,))
    proc.start()
    a.send(0)
    a.recv()
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        a.send(i)
        a.recv()
        out.append(time.perf_counter() - t0)
    a.send(None)
    proc.join()
    return out


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    from cfn_core import Coordinator, load_config

    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.talk", description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="round trips per arm")
    parser.add_argument("--plugins", default="", help="e.g. redis, or batch,shard")
    args = parser.parse_args(argv)
    config = load_config(None, overrides={"plugins": args.plugins, "workload.agents": "2",
                                          "workload.handler": "cfn_core.bench.talk:PingAgent",
                                          "workload.timeout": "600",
                                          # the task holds every reply it consumed until it ends (settled with it)
                                          "bus.inbox_depth": "0"})
    result = Coordinator(config).run([args.n])
    (r,) = result.results.values()
    if not r.ok:
        print(f"talk bench failed: {r.error}", file=sys.stderr)
        return 1
    cfn = r.value
    pipe = pipe_round_trips(args.n)
    rows = [("cfn request/reply" + (f" ({args.plugins})" if args.plugins else " (shm)"), cfn), ("multiprocessing.Pipe", pipe)]
    for name, values in rows:
        print(f"{name:32} p50 {_pct(values, 50) * 1e6:8.1f} us   p99 {_pct(values, 99) * 1e6:8.1f} us")
    print(f"ratio p50 {_pct(cfn, 50) / _pct(pipe, 50):.1f}x   p99 {_pct(cfn, 99) / _pct(pipe, 99):.1f}x  (n = {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
