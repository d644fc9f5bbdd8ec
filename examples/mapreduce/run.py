"""Count the words of a generated corpus with 200 agents that send each other their counts.

    python run.py                              # cfn.toml: 200 agents, baseline
    python run.py --plugins pool,parallel      # the same, with forked, pre-warmed agents
    python run.py --agents 500 --reducers 16

The coordinator hands one document to each agent; the agents send their counts by
key to the reducers with ``agent.send`` and the reducers add up what they
``agent.receive`` (see wordcount.py).  This script checks that the reducers' totals
equal the corpus' own counts and that every message sent was received.
Exit status 0 when they do, else 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from cfn_core import CfnError, Coordinator, load_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# agents are separate processes that import the handler by name: let them find wordcount.py
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

from wordcount import generate_corpus, words  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, help="documents = agents (default: cfn.toml)")
    parser.add_argument("--reducers", type=int, default=8, help="agents that reduce (each word belongs to one)")
    parser.add_argument("--plugins", help="e.g. pool,parallel (default: cfn.toml)")
    parser.add_argument("--words", type=int, default=300, help="words per document")
    args = parser.parse_args(argv)

    overrides = {
        "workload.agents": args.agents,
        "plugins": args.plugins,
    }
    try:
        config = load_config(HERE / "cfn.toml", overrides=overrides)
        if "pool" in config.plugins:
            # the reducers are the first agents of the run's directory, which lists a pool's
            # idle agents too: the pool must hold exactly the agents that get a document
            config = load_config(HERE / "cfn.toml", overrides={**overrides, "pool.size": config.workload.agents})
    except CfnError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    w = config.workload
    corpus = generate_corpus(w.agents, args.words, seed=w.seed)
    expected = Counter(word for doc in corpus for word in words(doc))

    t0 = time.perf_counter()
    with Coordinator(config, progress=_progress if sys.stderr.isatty() else None) as coord:
        result = coord.run([{"document": doc, "reducers": args.reducers, "timeout": w.timeout} for doc in corpus])
    seconds = time.perf_counter() - t0

    reduced: Counter = Counter()
    holders: Counter = Counter()  # how many agents hold a part of each word's count (1: its reducer)
    reducer_of: dict[str, str] = {}
    failed = [r for r in result.results.values() if not r.ok]
    ok = [r for r in result.results.values() if r.ok]
    for r in ok:
        reduced.update(r.value["counts"])
        holders.update(r.value["counts"].keys())
        reducer_of.update(dict.fromkeys(r.value["counts"], r.agent))
    sent = sum(r.value["sent"] for r in ok)
    received = sum(r.value["received"] for r in ok)
    reducers = sorted({r.agent for r in ok if r.value["counts"]})

    plugins = "+".join(result.plugins) or "baseline"
    print(f"{result.agents} agents ({plugins}), {sum(expected.values())} words, {len(expected)} distinct, "
          f"{len(reducers)} reducers, {seconds:.2f} s")
    print(f"agent messages {received}/{sent} received, {len(failed)} task(s) failed")
    for word, n in reduced.most_common(5):
        print(f"  {word:<8} {n:>6}  (reduced by {reducer_of[word]})")
    match = reduced == expected and max(holders.values(), default=1) == 1
    if match:
        print("check: the reducers' totals equal the corpus' counts exactly, each word on one reducer")
    else:
        missing = sum((expected - reduced).values())
        extra = sum((reduced - expected).values())
        split = sum(1 for n in holders.values() if n > 1)
        print(f"check FAILED: {missing} word occurrences missing, {extra} extra, {split} word(s) on several agents")
    for r in failed[:5]:
        print(f"  task {r.task} on {r.agent}: {r.error}")
    return 0 if match and sent == received and result.ok else 1


def _progress(phase: str, done: int, total: int) -> None:
    end = "\n" if phase == "collect" and done == total else ""
    print(f"\r{phase:<10} {done}/{total}   ", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
