"""LLM usage (tokens, cost) as tasks report it, and the run's totals (docs/LLM_SWARMS.md).

A task reports what it spent in one of three ways; the agent puts it in its result
record's ``usage`` field and the coordinator hands the result to ``cfn_task_result``
(an accounting plugin such as cfn-llm adds it up):

* a Python handler calls ``agent.usage(tokens_in=, tokens_out=, cost_usd=, turns=)``
  (any number of times per task: the figures add up);
* a command prints a line on its stderr that is a JSON object with a ``cfn_usage``
  object: ``{"cfn_usage": {"tokens_in": 812, "tokens_out": 95, "cost_usd": 0.0042}}``
  (see :func:`usage_from_stderr`);
* a command prints what its CLI reports on stdout (``claude -p --output-format json``);
  that is the task's value, which an accounting plugin reads itself.

:class:`Usage` is the sum kept by an accounting plugin and read by a budget
(``ctx.usage`` on the coordinator: one per session).
"""

from __future__ import annotations

import json
import math
from typing import Any

from attrs import define, field

#: the keys of a usage document, with their types
USAGE_KEYS = {"tokens_in": int, "tokens_out": int, "cost_usd": float, "turns": int}


def check_usage(doc: Any) -> dict[str, float] | None:
    """The usage figures of ``doc`` (``{"tokens_in": ...}``), or None when it is not one.

    Unknown keys are ignored; a known key must be a finite number >= 0.
    """
    if not isinstance(doc, dict):
        return None
    out: dict[str, float] = {}
    for key, typ in USAGE_KEYS.items():
        value = doc.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return None
        out[key] = int(value) if typ is int else float(value)
    return out


def add_usage(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """``total`` with ``more`` added in (in place; returned)."""
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total


def usage_from_stderr(stderr: bytes | str) -> dict[str, float] | None:
    """The sum of the ``{"cfn_usage": {...}}`` lines of a command's stderr, None without any."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    if "cfn_usage" not in text:
        return None
    total: dict[str, float] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and "cfn_usage" in line):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        figures = check_usage(doc.get("cfn_usage")) if isinstance(doc, dict) else None
        if figures:
            total = add_usage(total or {}, figures)
    return total


@define
class Usage:
    """What a session spent: tokens by direction, dollars, turns, and how many results said so."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    turns: int = 0
    reports: int = 0
    #: the plugins that count into it (an accounting source); a budget needs one
    sources: list[str] = field(factory=list)

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def add(self, figures: dict[str, float]) -> None:
        self.tokens_in += int(figures.get("tokens_in", 0))
        self.tokens_out += int(figures.get("tokens_out", 0))
        self.cost_usd += float(figures.get("cost_usd", 0.0))
        self.turns += int(figures.get("turns", 0))
        self.reports += 1
