"""Benchmarks of agents that talk (the figures in docs/BENCHMARKS.md "Agents that talk").

``python -m cfn_core.bench.talk [request] [--n 2000] [--plugins redis] [--ray]``: the request/reply
round trip between two agents against a ``multiprocessing.Pipe`` round trip (and, with
``--ray`` and Ray installed, a local Ray actor's method call), all measured in the same
run, on the same machine; prints p50/p99 of each and their ratios.

``python -m cfn_core.bench.talk throughput [--agents 500] [--messages 200] [--reps 1]``:
every agent sends ``--messages`` messages to peers it chooses (at random, from a seed), and
receives every one sent to it; the arms, without and with cfn-batch, alternate in one run
(``--reps`` times each).  Prints messages/s per arm and the ratio, and fails unless
delivery is exact: every agent received exactly what the plan sent it, no message twice.

Nothing else imports this module except the agents it starts
(``handler = "cfn_core.bench.talk:PingAgent"`` / ``"cfn_core.bench.talk:LoadAgent"``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
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


def choose_peers(sender: str, everyone: list[str], n: int, seed: int) -> list[str]:
    """The ``n`` receivers ``sender`` chooses (with repeats, never itself): the same in every process."""
    rng = random.Random(f"{seed}:{sender}")
    others = [a for a in everyone if a != sender]
    return [rng.choice(others) for _ in range(n)]


class LoadAgent:
    """One agent of the throughput benchmark: send to the peers it chooses, then receive its share.

    The task is ``{"agents": [ids], "expected": [count per id], "messages": n, "seed": s}``:
    the plan the benchmark computed with :func:`choose_peers` for every agent, so that each
    one knows how many messages to wait for.  Returns wall-clock times (``time.time()``,
    comparable between the processes of one machine) and the sender of every message
    received, by its index, for the exact-delivery check.
    """

    def on_task(self, task, agent):
        everyone = task["agents"]
        if sorted(agent.peers() + [agent.id]) != everyone:
            raise RuntimeError(f"the run's directory is not the planned {len(everyone)} agents: {len(agent.peers()) + 1}")
        index = {a: i for i, a in enumerate(everyone)}
        receivers = choose_peers(agent.id, everyone, task["messages"], task["seed"])
        started = time.time()
        for seq, to in enumerate(receivers):
            agent.send(to, seq, kind="load")
        sent = time.time()
        senders: dict[str, list[int]] = {}  # sender index (a JSON key) -> sequence numbers
        for _ in range(task["expected"][index[agent.id]]):
            m = agent.receive(timeout=task["timeout"], kind="load")
            senders.setdefault(str(index[m.sender]), []).append(m.body)
        return {"started": started, "sent": sent, "done": time.time(), "received": senders}


def delivery_errors(plan: dict[str, list[str]], received: dict[str, dict]) -> int:
    """How many (receiver, sender) pairs did not get exactly what ``plan`` sent, in order.

    ``plan`` is sender -> its receivers (message ``seq`` went to ``plan[sender][seq]``);
    ``received`` is receiver -> its task's value (``"received"``: sender index -> seqs).
    Exact means per-sender FIFO, nothing missing, nothing twice; an agent that did not
    report counts as every pair it should have received.
    """
    index = {a: i for i, a in enumerate(sorted(plan))}
    want: dict[str, dict[str, list[int]]] = {a: {} for a in plan}  # receiver -> sender index -> seqs
    for sender, receivers in plan.items():
        for seq, to in enumerate(receivers):
            want[to].setdefault(str(index[sender]), []).append(seq)
    wrong = 0
    for receiver, pairs in want.items():
        got = received.get(receiver, {}).get("received", {})
        wrong += sum(1 for k in set(pairs) | set(got) if pairs.get(k) != got.get(k))
    return wrong


def throughput_arm(plugins: str, agents: int, messages: int, seed: int, timeout: float) -> dict:
    """One run of the throughput benchmark on ``plugins``; its figures and the delivery check."""
    from cfn_core import Coordinator, load_config, roles_of

    config = load_config(None, overrides={
        "plugins": plugins, "agents.talker.count": str(agents), "workload.agents": str(agents), "pool.size": str(agents),
        "workload.handler": "cfn_core.bench.talk:LoadAgent", "workload.timeout": str(timeout),
        "bus.inbox_depth": "0",  # a task holds what it received until it ends (settled with it)
    })
    everyone = sorted(roles_of(config)["talker"].agent_id(i) for i in range(1, agents + 1))
    plan = {a: choose_peers(a, everyone, messages, seed) for a in everyone}
    expected = [0] * agents
    index = {a: i for i, a in enumerate(everyone)}
    for receivers in plan.values():
        for to in receivers:
            expected[index[to]] += 1
    task = {"agents": everyone, "expected": expected, "messages": messages, "seed": seed, "timeout": timeout}
    result = Coordinator(config).run([task] * agents)
    failed = [r for r in result.results.values() if not r.ok]
    if failed:
        return {"ok": False, "error": f"{len(failed)} task(s) failed, e.g. {failed[0].agent}: {failed[0].error}"}
    by_agent = {r.agent: r.value for r in result.results.values()}
    wrong = delivery_errors(plan, by_agent)
    start = min(v["started"] for v in by_agent.values())
    end = max(v["done"] for v in by_agent.values())
    total = agents * messages
    return {"ok": wrong == 0, "error": f"{wrong} (sender, receiver) pair(s) wrong",
            "rate": total / (end - start), "seconds": end - start, "total": total, "plugins": "+".join(result.plugins)}


def throughput(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.talk throughput", description=__doc__)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200, help="messages each agent sends")
    parser.add_argument("--reps", type=int, default=1, help="runs of each arm, alternating")
    parser.add_argument("--plugins", default="pool,parallel", help="the plugins of both arms (the batch arm adds batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    base = ",".join(p for p in args.plugins.split(",") if p and p != "batch")
    arms = {"without batch": base, "with batch": ",".join(filter(None, [base, "batch"]))}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(args.reps):
        for name, plugins in arms.items():
            r = throughput_arm(plugins, args.agents, args.messages, args.seed + rep, args.timeout)
            if not r["ok"]:
                print(f"{name}: FAILED: {r['error']}", file=sys.stderr)
                return 1
            rates[name].append(r["rate"])
            print(f"{name:14} ({r['plugins']}) {r['total']} messages in {r['seconds']:.2f} s: "
                  f"{r['rate']:,.0f} messages/s, delivery exact", flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"{args.agents} agents x {args.messages} messages, median of {args.reps}: "
          + ", ".join(f"{name} {v:,.0f}/s" for name, v in med.items())
          + f"; ratio with/without batch {med['with batch'] / med['without batch']:.2f}x")
    return 0


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


def ray_round_trips(n: int) -> list[float] | None:
    """``n`` calls of a Ray actor's echo method (``ray.get(actor.echo.remote(i))``), or None
    without Ray: a local Ray, started here and shut down after (not a dependency of cfn)."""
    try:
        import ray
    except ImportError:
        return None

    @ray.remote
    class Echo:
        def echo(self, x):
            return x

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actor = Echo.remote()
        ray.get(actor.echo.remote(0))
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            ray.get(actor.echo.remote(i))
            out.append(time.perf_counter() - t0)
        return out
    finally:
        ray.shutdown()


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["throughput"]:
        return throughput(argv[1:])
    if argv[:1] == ["request"]:
        argv = argv[1:]
    from cfn_core import Coordinator, load_config

    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.talk", description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="round trips per arm")
    parser.add_argument("--plugins", default="", help="e.g. redis, or batch,shard")
    parser.add_argument("--ray", action="store_true", help="also a Ray actor call (pip install ray; not a dependency)")
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
    if args.ray:
        calls = ray_round_trips(args.n)
        if calls is None:
            print("talk bench: --ray needs Ray installed (pip install ray)", file=sys.stderr)
            return 2
        rows.append(("Ray actor call (local)", calls))
    for name, values in rows:
        print(f"{name:32} p50 {_pct(values, 50) * 1e6:8.1f} us   p99 {_pct(values, 99) * 1e6:8.1f} us")
    print(f"ratio p50 {_pct(cfn, 50) / _pct(pipe, 50):.1f}x   p99 {_pct(cfn, 99) / _pct(pipe, 99):.1f}x  (n = {args.n})")
    if args.ray:
        ray_p50 = _pct(rows[-1][1], 50)
        print(f"cfn / Ray actor call p50 {_pct(cfn, 50) / ray_p50:.2f}x   Ray / Pipe p50 {ray_p50 / _pct(pipe, 50):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
