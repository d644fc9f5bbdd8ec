"""Stream work through a coordinator: submit, take results as they finish, submit more.

    python stream.py [N]

Scores N sentences (default 200).  Every sentence with more than 6 distinct words gets a
follow-up task (its words reversed) submitted while the rest still run; a failed task is
reported, not fatal.  Prints one line per result and a summary line at the end.
"""

import random
import sys
from concurrent.futures import FIRST_COMPLETED, wait

from cfn_core import Coordinator, TaskFailed, load_config

WORDS = "agents talk over a bus that loses nothing while the pool keeps them warm".split()


def sentences(n, seed=7):
    rng = random.Random(seed)
    for i in range(n):
        yield {"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}


def main(n):
    config = load_config("cfn.toml")
    done = follow_ups = failed = 0
    agents = set()
    with Coordinator(config) as coord:
        pending = {coord.submit(s) for s in sentences(n)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    result = future.result()
                except TaskFailed as exc:
                    failed += 1
                    print(f"{exc.task}: failed: {exc.error}")
                    continue
                done += 1
                agents.add(result["pid"])
                print(f"{future.task_id}: sentence {result['id']}: {result['distinct']}/{result['words']} distinct")
                if result["distinct"] > 6 and result["id"] < n:  # more work, submitted while the rest run
                    follow_ups += 1
                    text = " ".join(reversed(WORDS[: result["distinct"]]))
                    pending.add(coord.submit({"id": n + result["id"], "text": text}))
    print(f"scored {done} sentences ({follow_ups} follow-ups) on {len(agents)} agents, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
