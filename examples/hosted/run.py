"""Run the hosted example: N researchers in a ring, each calling a fake LLM (python run.py [--agents N])."""

from __future__ import annotations

import argparse
import os
import sys
import time

from cfn_core import Coordinator, Task, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=None, help="researchers (default: cfn.toml's 10,000)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    overrides = {"workload.agents": args.agents} if args.agents else {}
    config = load_config(os.path.join(here, "cfn.toml"), overrides=overrides)
    n = config.workload.agents
    ids = [f"agent-{i:04d}" for i in range(1, n + 1)]
    tasks = [
        Task(id=f"topic-{i}", payload={"topic": i, "next": ids[(i + 1) % n], "previous": ids[(i - 1) % n]})
        for i in range(n)
    ]
    t0 = time.perf_counter()
    with Coordinator(config) as coord:
        opened = time.perf_counter()
        result = coord.run(tasks)
        ran = time.perf_counter()
        hosts = sorted({h.info.get("host") for h in coord.ctx.agents.values()})
    closed = time.perf_counter()
    values = [r.value for r in result.results.values() if r.ok]
    ring_ok = all(v["neighbour"] == (int(t.split("-")[1]) - 1) % n
                  for t, v in ((t, r.value) for t, r in result.results.items() if r.ok))
    print(f"{n} researchers in {len(hosts)} host process(es): {', '.join(h for h in hosts if h)}")
    print(f"round: {ran - opened:.2f} s (each agent awaited a 0.5-1.5 s LLM call); whole run {closed - t0:.2f} s")
    print(f"reports: {len(values)}/{n}, delivery {result.delivery_rate:.3f}, ring intact: {ring_ok}")
    ok = result.ok and len(values) == n and ring_ok and result.delivery_rate == 1.0
    print("hosted example OK" if ok else "hosted example FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
