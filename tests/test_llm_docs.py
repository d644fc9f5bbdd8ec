"""docs/LLM_SWARMS.md: every cfn.toml block loads (the keys exist, the values are allowed), the Python runs."""

import os
import sys
import tomllib
from pathlib import Path

import pytest

from cfn_core import config_from_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_snippets import snippets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [s for s in snippets(ROOT, "docs/LLM_SWARMS.md") if s.lang in ("toml", "python")]


def test_the_page_has_its_blocks():
    assert sum(1 for s in BLOCKS if s.lang == "toml") >= 6 and any(s.lang == "python" for s in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda s: f"line {s.line}")
def test_every_block_is_valid(block, tmp_path):
    if block.lang == "toml":
        data = tomllib.loads(block.text)
        if data.get("limits", {}).get("budget_usd") or data.get("limits", {}).get("budget_tokens"):
            assert "llm" in data["plugins"]  # what the page says a budget needs
        config_from_dict(data)
    else:
        namespace = {}
        exec(compile(block.text, f"LLM_SWARMS.md:{block.line}", "exec"), namespace)
        from cfn_core import RateLimited

        if "ask" in namespace:
            with pytest.raises(RateLimited) as info:
                namespace["ask"]("prompt", None)
            assert info.value.retry_after == 2.0
        else:
            import json

            path = tmp_path / "events.jsonl"
            events = [("task_assigned", 100.0, ""), ("task_assigned", 100.5, ""), ("task_retried", 100.7, "rate limited (not charged"),
                      ("task_assigned", 102.2, "")]
            path.write_text("".join(json.dumps({"v": 1, "ts": ts, "type": t, "reason": why}) + "\n" for t, ts, why in events))
            assert namespace["starts_per_second"](path) == {0: (2, 1), 1: (0, 0), 2: (1, 0)}
