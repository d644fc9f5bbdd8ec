"""Count the words of a generated corpus with 200 agents exchanging partial counts.

    python run.py                              # cfn.toml: 200 agents, baseline
    python run.py --plugins pool,parallel      # the same, with forked, pre-warmed agents
    python run.py --agents 500 --messages-per-agent 16

The coordinator hands one document to each agent, the agents shuffle their
counts to their peers and reduce what they receive (see wordcount.py), and this
script checks that the sum of every agent's result equals the corpus' own counts.
Exit status 0 when the totals match and every message was delivered, else 1.
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
    parser.add_argument("--messages-per-agent", type=int, help="peers each agent shuffles to (default: cfn.toml)")
    parser.add_argument("--plugins", help="e.g. pool,parallel (default: cfn.toml)")
    parser.add_argument("--words", type=int, default=300, help="words per document")
    args = parser.parse_args(argv)

    overrides = {
        "workload.agents": args.agents,
        "workload.messages_per_agent": args.messages_per_agent,
        "plugins": args.plugins,
    }
    try:
        config = load_config(HERE / "cfn.toml", overrides=overrides)
    except CfnError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    w = config.workload
    corpus = generate_corpus(w.agents, args.words, seed=w.seed)
    expected = Counter(word for doc in corpus for word in words(doc))

    t0 = time.perf_counter()
    with Coordinator(config, progress=_progress if sys.stderr.isatty() else None) as coord:
        result = coord.run(corpus)
    seconds = time.perf_counter() - t0

    reduced: Counter = Counter()
    holders: Counter = Counter()  # how many agents hold a part of each word's count
    failed = [r for r in result.results.values() if not r.ok]
    for r in result.results.values():
        if r.ok and isinstance(r.value, dict):
            reduced.update(r.value)
            holders.update(r.value.keys())

    plugins = "+".join(result.plugins) or "baseline"
    print(f"{result.agents} agents ({plugins}), {sum(expected.values())} words, {len(expected)} distinct, "
          f"{w.messages_per_agent} peers per agent, {seconds:.2f} s")
    print(f"messages {result.delivered}/{result.planned} delivered ({result.delivery_rate:.2%}), "
          f"{len(failed)} task(s) failed")
    for word, n in reduced.most_common(5):
        print(f"  {word:<8} {n:>6}  (spread over {holders[word]} agents)")
    match = reduced == expected
    if match:
        print("check: the agents' counts add up to the corpus' counts exactly")
    else:
        missing = sum((expected - reduced).values())
        extra = sum((reduced - expected).values())
        print(f"check FAILED: {missing} word occurrences missing, {extra} extra")
    for r in failed[:5]:
        print(f"  task {r.task} on {r.agent}: {r.error}")
    return 0 if match and result.ok else 1


def _progress(phase: str, done: int, total: int) -> None:
    end = "\n" if phase == "collect" and done == total else ""
    print(f"\r{phase:<10} {done}/{total}   ", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
