"""Benchmarks of cfn-pool (with cfn-parallel), each against the baseline measured in the same run.

Usage (from the repository root, with the venv's python)::

    python plugins/cfn-pool/bench/bench_pool.py cold --agents 500      # baseline vs pool+parallel, ratio
    python plugins/cfn-pool/bench/bench_pool.py warm --agents 500      # rounds 2.. of a pooled session
    python plugins/cfn-pool/bench/bench_pool.py init --size 50         # pool fill at open, zygote vs fresh interpreters
    python plugins/cfn-pool/bench/bench_pool.py assign                 # assignment latency p50/p99
    python plugins/cfn-pool/bench/bench_pool.py hitrate                # steady recurring workload
    python plugins/cfn-pool/bench/bench_pool.py pss --size 20          # memory of a 20-agent pool (PSS)
    python plugins/cfn-pool/bench/bench_pool.py all                    # everything above, small sizes first

Each prints one JSON line per measurement and a Markdown table at the end
(``--json`` prints only JSON).  Wall times are for comparison inside one run:
the ratios are what carries to another machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

from cfn_core import Coordinator, config_from_dict

ROWS: list[dict] = []


def emit(row: dict) -> dict:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def load() -> dict:
    import psutil

    return {"load1": round(os.getloadavg()[0], 2), "cpu_percent": psutil.cpu_percent(0.2)}


def session(plugins, agents: int, rounds: int = 1, **tables) -> dict:
    """Open a coordinator, run ``rounds`` rounds, close; the wall times of each part."""
    data = {"plugins": list(plugins), "workload": {"agents": agents, "rounds": rounds}, **tables}
    data["run"] = {"max_agents": max(10_000, agents), **data.get("run", {})}
    config = config_from_dict(data)
    gc.collect()
    t0 = time.perf_counter()
    coord = Coordinator(config)
    try:
        coord.open()
        t_open = time.perf_counter()
        result = coord.run()
        t_run = time.perf_counter()
    finally:
        coord.close()
    t_close = time.perf_counter()
    r1 = result.rounds[0]
    return {
        "plugins": "+".join(plugins) or "baseline",
        "agents": agents,
        "ok": result.ok,
        "delivery_rate": result.delivery_rate,
        "open_s": round(t_open - t0, 4),
        "round_s": [round(r.seconds, 4) for r in result.rounds],
        "cold_s": round(t_open - t0 + r1.seconds, 4),
        "close_s": round(t_close - t_run, 4),
        "phases_round1": {k: round(v, 4) for k, v in r1.phases.items()},
        "spawn_failures": len(r1.spawn_failures),
        "figures": result.plugin_figures,
    }


def cold(agents: int, baseline: bool = True) -> None:
    """Open + first round, star, trivial handler: baseline vs pool+parallel (and each alone)."""
    fast = session(["pool", "parallel"], agents)
    emit({"bench": "cold", **fast, **load()})
    if baseline:
        base = session([], agents)
        emit({"bench": "cold", **base, **load()})
        emit({"bench": "cold-ratio", "agents": agents, "baseline_s": base["cold_s"], "pool+parallel_s": fast["cold_s"],
              "ratio": round(base["cold_s"] / fast["cold_s"], 1)})


def warm(agents: int, rounds: int = 6) -> None:
    """Rounds after the first reuse the pooled agents: distribution and collection only."""
    s = session(["pool", "parallel"], agents, rounds=rounds)
    warm_rounds = s["round_s"][1:]
    emit({"bench": "warm", "agents": agents, "cold_round_s": s["round_s"][0], "warm_rounds_s": warm_rounds,
          "warm_median_s": round(statistics.median(warm_rounds), 4), "warm_min_s": min(warm_rounds), "ok": s["ok"], **load()})


def init(size: int) -> None:
    """Pool fill at session open: zygote forks vs fresh interpreters (what the zygote buys)."""
    for zygote in (True, False):
        for plugins in (["pool", "parallel"], ["pool"]):
            s = session(plugins, 1, pool={"size": size, "zygote": zygote})
            f = s["figures"]["pool"]
            emit({"bench": "init", "plugins": "+".join(plugins), "size": size, "zygote": zygote,
                  "init_s": f["init_seconds"], "zygote_start_s": f["zygote_start_seconds"], "init_ready": f["init_ready"], **load()})


def assign(agents: int = 500, tasks: int = 5000) -> None:
    """Choosing an idle agent for a task (the pool's cfn_assign), over many tasks."""
    data = {"plugins": ["pool", "parallel"], "workload": {"agents": agents, "tasks": tasks, "rounds": 2}, "pool": {"size": agents}}
    config = config_from_dict(data)
    with Coordinator(config) as coord:
        result = coord.run()
    f = result.plugin_figures["pool"]
    emit({"bench": "assign", "agents": agents, "tasks": tasks, "rounds": 2, "assign_p50_ms": f["assign_p50_ms"],
          "assign_p99_ms": f["assign_p99_ms"], "ok": result.ok, **load()})


def hitrate(agents: int = 50, rounds: int = 20, size: int = 20) -> None:
    """A steady recurring workload: the same number of agents every round."""
    s = session(["pool", "parallel"], agents, rounds=rounds, pool={"size": size})
    f = s["figures"]["pool"]
    emit({"bench": "hitrate", "agents": agents, "rounds": rounds, "size": size, "hit_rate": f["hit_rate"],
          "hits": f["hits"], "misses": f["misses"], "ok": s["ok"]})


def pss(size: int = 20) -> None:
    """Memory a pool of ``size`` idle agents costs: PSS (shared pages split between sharers), not RSS."""
    import psutil

    for zygote in (True, False):
        config = config_from_dict({"plugins": ["pool"], "workload": {"agents": 1}, "pool": {"size": size, "zygote": zygote}})
        with Coordinator(config) as coord:
            procs = psutil.Process().children(recursive=True)
            mem = [p.memory_full_info() for p in procs]
            emit({"bench": "pss", "size": size, "zygote": zygote, "processes": len(procs),
                  "pss_total_mb": round(sum(m.pss for m in mem) / 2**20, 1),
                  "rss_total_mb": round(sum(m.rss for m in mem) / 2**20, 1),
                  "uss_total_mb": round(sum(m.uss for m in mem) / 2**20, 1)})


def table() -> str:
    lines = ["| bench | figures |", "|---|---|"]
    for row in ROWS:
        keep = {k: v for k, v in row.items() if k not in ("bench", "figures", "phases_round1")}
        lines.append(f"| {row['bench']} | {json.dumps(keep)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cold", "warm", "init", "assign", "hitrate", "pss", "all"])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="cold: skip the baseline (slow: a fresh interpreter per agent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    w = args.what
    if w in ("init", "all"):
        init(args.size or 50)
    if w in ("pss", "all"):
        pss(args.size or 20)
    if w in ("hitrate", "all"):
        hitrate(rounds=args.rounds or 20, size=args.size or 20)
    if w in ("assign", "all"):
        assign(args.agents)
    if w in ("warm", "all"):
        warm(args.agents, rounds=args.rounds or 6)
    if w in ("cold", "all"):
        cold(args.agents, baseline=not args.no_baseline)
    if not args.json:
        print(table())
    return 0 if all(r.get("ok", True) for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
