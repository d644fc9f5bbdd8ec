"""A planner/coder/reviewer pipeline over three roles: python run.py [JOB]."""

from __future__ import annotations

import sys
from pathlib import Path

from cfn_core import Coordinator, Task, load_config

JOB = "parse the config validate the input run every task write the report"


def main(argv: list[str]) -> int:
    job = " ".join(argv) or JOB
    config = load_config(Path(__file__).with_name("cfn.toml"))
    with Coordinator(config) as coord:
        planned = coord.run([Task("plan", {"job": job, "parts": 4}, role="planner")]).results["plan"]
        if not planned.ok:
            print(f"plan FAILED {planned.error}")
            return 1
        print(f"plan     {planned.agent}: {len(planned.value)} parts")
        code = coord.run([Task(f"code-{p['part']}", p["spec"], role="coder") for p in planned.value])
        reviews = coord.run(
            [Task(f"review-{tid.split('-')[1]}", r.value, role="reviewer") for tid, r in sorted(code.results.items()) if r.ok]
        )
    failed = code.failed + reviews.failed
    for tid, r in sorted(code.results.items()):
        review = reviews.results.get(f"review-{tid.split('-')[1]}")
        verdict = review.value["verdict"] if review is not None and review.ok else "no review"
        first = r.value.splitlines()[0] if r.ok else f"FAILED {r.error}"
        print(f"{tid}   {r.agent}: {first:<40} {review.agent if review else '-'}: {verdict}")
    approved = sum(1 for r in reviews.results.values() if r.ok and r.value["verdict"] == "approve")
    print(f"{approved}/{len(code.results)} approved, {failed} task(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
