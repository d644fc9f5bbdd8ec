"""examples/mapreduce: 200 agents count words and send each other their counts (agent.send / receive)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from cfn_core.plugins import installed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mapreduce"


def load_wordcount():
    spec = importlib.util.spec_from_file_location("example_wordcount", EXAMPLE / "wordcount.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_partition_gives_each_word_one_reducer_in_every_process():
    wc = load_wordcount()
    doc = wc.generate_corpus(1, 500, seed=3)[0]
    for word in set(wc.words(doc)):
        assert 0 <= wc.partition(word, 8) < 8
    # crc32, not hash(): a fresh interpreter (another agent) puts a word in the same part
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import wordcount; print(wordcount.partition('the', 8))"
    other = subprocess.run([sys.executable, "-c", probe, str(EXAMPLE)], capture_output=True, text=True, check=True)
    assert int(other.stdout) == wc.partition("the", 8)


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
    # 200 agents x 8 reducers, less the part each reducer keeps: every one received once
    assert "agent messages 1592/1592 received, 0 task(s) failed" in proc.stdout
    assert "check: the reducers' totals equal the corpus' counts exactly, each word on one reducer" in proc.stdout


def test_a_small_run_on_the_baseline_with_other_reducers(bus_root, no_leaks):
    """Fresh interpreters, no plugin: the same exchange; the counts add up for any number of reducers."""
    args = [sys.executable, str(EXAMPLE / "run.py"), "--plugins", "", "--agents", "6", "--reducers", "3", "--words", "50"]
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    proc = subprocess.run(args, cwd=bus_root, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 agents (baseline)" in proc.stdout and "3 reducers" in proc.stdout
    assert "agent messages 15/15 received, 0 task(s) failed" in proc.stdout  # 6 x 3 - 3
    assert "check: the reducers' totals equal the corpus' counts exactly" in proc.stdout
