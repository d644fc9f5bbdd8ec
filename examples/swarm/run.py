"""A planner/coder/reviewer swarm of shell agents that talk: ``python run.py [--plugins pool,parallel] [JOB]``.

One round of one task per agent: the planner gets the job, every coder and reviewer a
task that waits for messages.  From then on the agents work through ``cfn msg`` alone
(swarm.sh): the planner sends the parts, each coder asks its reviewer for a verdict and
sends its result to the planner, the planner collects them and stops the reviewers.
This script prints what the planner collected and checks it against what the
reviewers say they reviewed.  Exit status 0 when every part was reviewed exactly once
and the planner collected every part, else 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

from cfn_core import CfnError, Coordinator, Task, load_config

HERE = Path(__file__).resolve().parent

#: the default job: 40 parts of two words for the 40 coders
JOB = (
    "parse arguments read config validate input open database migrate schema load users "
    "hash passwords check sessions route requests render pages cache results compress output "
    "log errors rotate logs send mail queue jobs retry failures schedule tasks watch files "
    "sync mirrors backup data restore data export csv import csv resize images scan uploads "
    "index documents search text rank results paginate lists sign tokens verify tokens "
    "limit rates count metrics trace calls write report draw charts clean temp stop workers tidy up"
)

#: one line of the planner's collection: "<part> <coder> <reviewer> <verdict>: <spec>"
COLLECTED = re.compile(r"(\d+) (\S+) (\S+) (approve|revise): (.*)")
#: one line of a reviewer's output: "reviewed part <n> by <coder>: <verdict>"
REVIEWED = re.compile(r"reviewed part (\d+) by (\S+): (approve|revise)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", help="e.g. pool,parallel (default: cfn.toml)")
    parser.add_argument("--coders", type=int, help="coders, i.e. parts (default: cfn.toml, 40)")
    parser.add_argument("--reviewers", type=int, help="reviewers (default: cfn.toml, 10)")
    parser.add_argument("job", nargs="*", help="the job to split (default: a 40-part job)")
    args = parser.parse_args(argv)
    overrides = {"plugins": args.plugins, "agents.coder.count": args.coders, "agents.reviewer.count": args.reviewers}
    try:
        config = load_config(HERE / "cfn.toml", overrides=overrides)
        roles = {name: role.count for name, role in config.roles.items()}
        if "pool" in config.plugins:
            # a pool starts [pool] size agents; the planner sends a part to every coder in the
            # directory, so the pool must hold exactly the swarm, not idle coders with no task
            config = load_config(HERE / "cfn.toml", overrides={**overrides, "pool.size": sum(roles.values())})
    except CfnError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    job = " ".join(args.job) or JOB

    tasks = [Task("plan", job, role="planner")]
    tasks += [Task(f"code-{i:03d}", "", role="coder") for i in range(1, roles["coder"] + 1)]
    tasks += [Task(f"review-{i:03d}", "", role="reviewer") for i in range(1, roles["reviewer"] + 1)]
    t0 = time.perf_counter()
    with Coordinator(config) as coord:
        result = coord.run(tasks)
    seconds = time.perf_counter() - t0

    plan = result.results["plan"]
    plugins = "+".join(result.plugins) or "baseline"
    print(f"{result.agents} agents ({plugins}): 1 planner, {roles['coder']} coders, {roles['reviewer']} reviewers, "
          f"{seconds:.1f} s")
    failed = [r for r in result.results.values() if not r.ok]
    for r in sorted(failed, key=lambda r: r.task)[:5]:
        print(f"  FAILED {r.task} on {r.agent}: {r.error}")

    collected = [COLLECTED.fullmatch(line) for line in (plan.value or "").splitlines()] if plan.ok else []
    reviews = [REVIEWED.match(line) for r in result.results.values()
               if r.ok and r.task.startswith("review-") for line in r.value.splitlines()]
    reviews = [m for m in reviews if m]
    print(f"planner {plan.agent} collected:")
    for m in collected:
        print(f"  {m.group(0)}" if m else "  (a line the planner should not have written)")
    verdicts = Counter(m.group(4) for m in collected if m)
    parts = list(range(1, roles["coder"] + 1))
    got = sorted(int(m.group(1)) for m in collected if m)
    times_reviewed = Counter(int(m.group(1)) for m in reviews)
    per_reviewer = Counter(r.agent for r in result.results.values() if r.task.startswith("review-")
                           for _ in REVIEWED.finditer(r.value or ""))
    print(f"collected {len(got)}/{len(parts)} parts: {verdicts['approve']} approve, {verdicts['revise']} revise")
    print(f"reviews: {sum(times_reviewed.values())} by {len(per_reviewer)} reviewers "
          f"({min(per_reviewer.values(), default=0)}-{max(per_reviewer.values(), default=0)} each)")
    complete = got == parts and None not in collected
    once = all(times_reviewed[p] == 1 for p in parts) and sum(times_reviewed.values()) == len(parts)
    print("check: every part collected by the planner and reviewed exactly once" if complete and once and not failed
          else f"check FAILED: collected {got == parts}, reviewed once {once}, {len(failed)} task(s) failed")
    return 0 if complete and once and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
