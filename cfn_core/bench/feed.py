"""Feeding a coordinator: ``submit`` + ``as_completed`` against ``ProcessPoolExecutor``.

    python -m cfn_core.bench.feed [--agents 2,20,500] [--tasks 100000] [--reps 1]
        [--plugins pool,parallel [--plugins pool,parallel,batch]] [--prefetch 64] [--json out.json]

For every worker count, two arms, each a fresh interpreter (so neither inherits the
other's processes, caches or garbage):

- ``cfn`` (one arm per ``--plugins``, default ``pool,parallel`` and ``pool,parallel,batch``):
  ``with Coordinator(config) as coord:`` on those plugins (``pool.size`` = the
  worker count, ``[workload] prefetch`` = ``--prefetch``), ``--tasks`` trivial tasks
  (``cfn_core.handlers:echo`` of an integer) submitted at once, results taken with
  ``concurrent.futures.as_completed``;
- ``processpool``: ``ProcessPoolExecutor(max_workers=N)`` (fork), the same tasks through
  ``submit`` + ``as_completed``.

Each arm reports, in process: tasks per second from the first ``submit`` to the last
result (the workers already started: the pool's fill and the executor's first task are
outside the timing, and reported as ``start``), the submit-to-result latency p50/p99 of
those tasks (under that load: queueing included), and the unloaded round trip p50/p99 of
``--single`` tasks submitted one at a time; and, whole process, the arm's wall time from
the interpreter's start to its exit.  The arms alternate within every repetition (the
first one rotates), the printed ratios are cfn over processpool of the same run.  Every
arm checks the sum of its results; a wrong sum fails the arm and the command exits 1.
This is a benchmark, not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

ARMS = ("cfn", "processpool")


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def _measure(submit, as_completed, tasks: int, single: int) -> dict:
    """Time ``tasks`` submissions taken back with ``as_completed``, then ``single`` round trips."""
    submitted: dict = {}
    t0 = time.perf_counter()
    futures = []
    for i in range(tasks):
        f = submit(i)
        submitted[f] = time.perf_counter()
        futures.append(f)
    latencies = []
    total = 0
    for f in as_completed(futures):
        total += f.result()
        latencies.append(time.perf_counter() - submitted[f])
    seconds = time.perf_counter() - t0
    trips = []
    for i in range(single):
        t = time.perf_counter()
        submit(i).result()
        trips.append(time.perf_counter() - t)
    return {
        "tasks": tasks, "seconds": seconds, "rate": tasks / seconds, "ok": total == tasks * (tasks - 1) // 2,
        "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
        "single_p50": _percentile(trips, 50), "single_p99": _percentile(trips, 99),
    }


def _echo(x):
    return x


def run_arm(arm: str, agents: int, tasks: int, single: int, plugins: str, prefetch: int) -> dict:
    """One arm in this process (what the subprocess of :func:`main` runs)."""
    from concurrent.futures import as_completed

    t0 = time.perf_counter()
    if arm == "processpool":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=agents, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_echo, range(agents)))  # every worker started, as the pool's are
            start = time.perf_counter() - t0
            out = _measure(lambda p: pool.submit(_echo, p), as_completed, tasks, single)
    else:
        from cfn_core import Coordinator, load_config

        config = load_config(None, overrides={
            "plugins": plugins, "workload.agents": str(agents), "pool.size": str(agents),
            "workload.prefetch": str(prefetch), "workload.handler": "cfn_core.handlers:echo",
        })
        with Coordinator(config) as coord:
            list(coord.map(range(agents)))  # the feed's round holds its agents
            start = time.perf_counter() - t0
            out = _measure(coord.submit, as_completed, tasks, single)
    out.update(arm=arm, agents=agents, start=start)
    return out


def _run_subprocess(arm: str, args, agents: int) -> dict:
    """One arm in a fresh interpreter; ``arm`` is ``processpool`` or ``cfn:<plugins>``."""
    kind, _, plugins = arm.partition(":")
    cmd = [sys.executable, "-m", "cfn_core.bench.feed", "--arm", kind, "--agents", str(agents), "--tasks", str(args.tasks),
           "--single", str(args.single), "--plugins", plugins, "--prefetch", str(args.prefetch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"arm": arm, "agents": agents, "ok": False, "error": (proc.stderr or proc.stdout)[-2000:], "wall": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    out["arm"] = arm
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfn_core.bench.feed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="2,20,500", help="worker counts, comma-separated")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks per arm and worker count")
    parser.add_argument("--single", type=int, default=200, help="tasks submitted one at a time (unloaded latency)")
    parser.add_argument("--reps", type=int, default=1, help="runs of each arm, alternating")
    parser.add_argument("--plugins", action="append", help="a cfn arm's plugins (repeat for several arms; default: "
                        "pool,parallel and pool,parallel,batch)")
    parser.add_argument("--prefetch", type=int, default=64, help="[workload] prefetch of the cfn arms")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one arm may take")
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in this process
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.agents.split(",") if x.strip()]
    if args.arm:
        print(json.dumps(run_arm(args.arm, counts[0], args.tasks, args.single, (args.plugins or [""])[-1], args.prefetch)))
        return 0
    plugin_sets = args.plugins or ["pool,parallel", "pool,parallel,batch"]
    arms = [f"cfn:{p}" for p in plugin_sets] + ["processpool"]
    runs: list[dict] = []
    ok = True
    for n in counts:
        for rep in range(args.reps):
            order = arms[rep % len(arms):] + arms[: rep % len(arms)]  # the first arm rotates
            for arm in order:
                out = _run_subprocess(arm, args, n)
                runs.append(out)
                if not out.get("ok"):
                    ok = False
                    print(f"{arm} {n} workers: FAILED {out.get('error', 'wrong results')}", file=sys.stderr)
        by = {arm: [r for r in runs if r["agents"] == n and r["arm"] == arm and r.get("ok")] for arm in arms}
        med = {arm: {k: statistics.median([r[k] for r in rs if r.get(k) is not None]) if rs else None
                     for k in ("rate", "p50", "p99", "single_p50", "single_p99", "wall", "start")}
               for arm, rs in by.items()}
        for arm in arms:
            m = med[arm]
            if m["rate"] is None:
                continue
            label = f"cfn ({arm[4:] or 'baseline'}, prefetch {args.prefetch})" if arm.startswith("cfn:") else "processpool"
            print(f"{n:>4} workers  {label:<40} {m['rate']:>9.0f} tasks/s  latency p50 {_ms(m['p50'])} p99 {_ms(m['p99'])}"
                  f"  single p50 {_ms(m['single_p50'])} p99 {_ms(m['single_p99'])}  start {m['start']:.2f}s  whole process {m['wall']:.2f}s")
        p = med["processpool"]
        for arm in arms[:-1]:
            c = med[arm]
            if c["rate"] and p["rate"]:
                print(f"{n:>4} workers  ratio cfn ({arm[4:] or 'baseline'})/processpool (median of {args.reps}, {args.tasks} tasks): "
                      f"throughput {c['rate'] / p['rate']:.2f}x  single p50 {c['single_p50'] / p['single_p50']:.2f}x"
                      f"  whole process {c['wall'] / p['wall']:.2f}x")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
