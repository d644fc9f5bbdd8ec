"""Benchmarks of cfn-parallel, each against the baseline measured in the same run.

Usage (from the repository root, with the venv's python)::

    python plugins/cfn-parallel/bench/bench_parallel.py init --agents 700   # sequential vs parallel start-up
    python plugins/cfn-parallel/bench/bench_parallel.py cold --agents 2000  # pool+parallel, one cold coordination
    python plugins/cfn-parallel/bench/bench_parallel.py cold --agents 5000

``init`` is the plan's initialization benchmark: the time until N agents are
ready (the round's spawn + ready phases), for the baseline (one fresh
interpreter at a time), cfn-parallel alone (fresh interpreters, a window of
them) and cfn-parallel with cfn-pool (forks of the warm zygote).  It also
reports the spawn failure rate, the CPU use and load sampled during the burst
and whether the throttle engaged.  ``--skip-baseline`` leaves out the slow
sequential run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cfn_core import Coordinator, config_from_dict

ROWS: list[dict] = []


def emit(row: dict) -> dict:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def run(plugins, agents: int, **tables) -> dict:
    data = {"plugins": list(plugins), "workload": {"agents": agents}, "run": {"max_agents": max(10_000, agents)}, **tables}
    if "pool" in plugins:
        data.setdefault("pool", {}).setdefault("size", 0)  # cold: nothing pre-spawned, every agent is spawned by the round
    config = config_from_dict(data)
    t0 = time.perf_counter()
    with Coordinator(config) as coord:
        t_open = time.perf_counter()
        result = coord.run()
    t_close = time.perf_counter()
    r = result.rounds[0]
    figures = result.plugin_figures.get("parallel", {})
    return {
        "plugins": "+".join(plugins) or "baseline",
        "agents": agents,
        "ok": result.ok,
        "ready": r.agents,
        "startup_s": round(r.phases["spawn"] + r.phases["ready"], 4),
        "open_s": round(t_open - t0, 4),
        "round_s": round(r.seconds, 4),
        "cold_s": round(t_open - t0 + r.seconds, 4),
        "close_s": round(t_close - t_open - r.seconds, 4),
        "spawn_failures": len(r.spawn_failures),
        "failure_rate": figures.get("failure_rate"),
        "retries": figures.get("retries"),
        "throttle_engaged": figures.get("throttle_engaged"),
        "min_window": figures.get("min_window"),
        "cpu_max_percent": figures.get("cpu_max_percent"),
        "cpu_mean_percent": figures.get("cpu_mean_percent"),
        "load1_max": figures.get("load1_max"),
        "spawn_p99_ms": figures.get("spawn_p99_ms"),
        "load1_before": round(os.getloadavg()[0], 2),
    }


def init(agents: int, skip_baseline: bool) -> None:
    par = emit({"bench": "init", **run(["parallel"], agents)})
    fast = emit({"bench": "init", **run(["pool", "parallel"], agents)})
    if not skip_baseline:
        base = emit({"bench": "init", **run([], agents)})
        emit({
            "bench": "init-ratio",
            "agents": agents,
            "sequential_s": base["startup_s"],
            "parallel_s": par["startup_s"],
            "pool+parallel_s": fast["startup_s"],
            "parallel_ratio": round(base["startup_s"] / par["startup_s"], 1),
            "pool+parallel_ratio": round(base["startup_s"] / fast["startup_s"], 1),
        })


def cold(agents: int) -> None:
    emit({"bench": "cold", **run(["pool", "parallel"], agents)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["init", "cold"])
    parser.add_argument("--agents", type=int, default=700)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "init":
        init(args.agents, args.skip_baseline)
    else:
        cold(args.agents)
    return 0 if all(r.get("ok", True) for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
