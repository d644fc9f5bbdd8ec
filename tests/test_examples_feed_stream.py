"""examples/feed-stream: the README's command works as written (real agents, real pool)."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "feed-stream"


def test_stream_py_streams_every_result_and_its_follow_ups(bus_root, no_leaks):
    env = {**os.environ, "CFN_BUS_ROOT": str(bus_root)}
    proc = subprocess.run([sys.executable, "stream.py"], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    readme = (EXAMPLE / "README.md").read_text()
    summary = re.search(r"^    (scored .*)$", readme, re.M).group(1)
    assert lines[-1] == summary  # the README's figures: 200 sentences and their follow-ups, 4 pooled agents
    results = [ln for ln in lines[:-1] if re.match(r"^t\d{6}: sentence \d+: \d+/\d+ distinct$", ln)]
    assert len(results) == len(lines) - 1 == 263
    sentences = [int(re.search(r"sentence (\d+)", ln).group(1)) for ln in results]
    assert len(set(sentences)) == 263  # each once, follow-ups (ids >= 200) included
    assert sum(s >= 200 for s in sentences) == 63
