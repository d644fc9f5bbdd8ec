"""examples/mapreduce: 200 agents count words and shuffle partial counts over peer messages."""

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cfn_core.plugins import installed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mapreduce"


def load_wordcount():
    spec = importlib.util.spec_from_file_location("example_wordcount", EXAMPLE / "wordcount.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scatter_then_gather_loses_nothing():
    wc = load_wordcount()
    doc = wc.generate_corpus(1, 500, seed=3)[0]
    peers = ["a", "b", "a", "c"]  # a peer may be chosen twice: it then gets two parts
    parts = wc.wordcount.scatter(doc, peers)
    assert len(parts) == len(peers)
    assert not set(parts[0]) & set(parts[1])  # a word goes to exactly one part
    assert wc.wordcount.gather(doc, parts + [None]) == Counter(wc.words(doc))


def test_corpus_is_deterministic():
    wc = load_wordcount()
    assert wc.generate_corpus(3, 50, seed=1) == wc.generate_corpus(3, 50, seed=1)
    assert wc.generate_corpus(3, 50, seed=1) != wc.generate_corpus(3, 50, seed=2)


def test_200_agents_add_up_to_the_corpus(bus_root, no_leaks):
    # the README's command; the bundled pool and parallel plugins keep it fast when installed
    fast = [p for p in ("pool", "parallel") if p in installed()]
    args = [sys.executable, str(EXAMPLE / "run.py")] + (["--plugins", ",".join(fast)] if fast else [])
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    proc = subprocess.run(args, cwd=bus_root, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "200 agents" in proc.stdout
    assert "messages 2000/2000 delivered (100.00%), 0 task(s) failed" in proc.stdout
    assert "check: the agents' counts add up to the corpus' counts exactly" in proc.stdout
