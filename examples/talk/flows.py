"""Run the origin flows of agents that talk: ``python flows.py [--plugins batch,shard,pool] [--shell]``."""

import argparse
import os
import sys

from cfn_core import Coordinator, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
FLOWS = ["round trip", "five status updates", "relay"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugins", default="", help="e.g. batch,shard,pool or redis")
    parser.add_argument("--shell", action="store_true", help="also run the shell agents (cfn msg)")
    args = parser.parse_args()
    overrides = {"plugins": args.plugins, "workload.agents": "4", "pool.size": "4"} if "pool" in args.plugins else {
        "plugins": args.plugins, "workload.agents": "4"}
    config = load_config(os.path.join(HERE, "cfn.toml"), overrides=overrides)
    ok = True
    with Coordinator(config) as coord:
        for flow in FLOWS:
            result = coord.run([flow])
            (r,) = result.results.values()
            print(f"{flow}: {r.value if r.ok else r.error}")
            ok &= r.ok
        result = coord.run([f"sender {n}" for n in range(3)])
        for r in sorted(result.results.values(), key=lambda r: r.task):
            print(f"three senders x 10, {r.task}: {r.value if r.ok else r.error}")
            ok &= r.ok and r.value == list(range(10))
    if args.shell:
        shell = config.evolve(workload={"handler": "", "command": f"sh {os.path.join(HERE, 'shell_agent.sh')}",
                                        "agents": 2})
        with Coordinator(shell) as coord:
            for tasks in (["ask", "answer"], ["time"]):
                result = coord.run(tasks)
                for r in sorted(result.results.values(), key=lambda r: r.task):
                    print(f"shell {r.task}: {r.value.strip() if r.ok else r.error}")
                    ok &= r.ok
    print("all flows OK" if ok else "some flow FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
