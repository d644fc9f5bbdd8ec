"""cfn-llm: what a swarm of LLM agents spent, per task, agent, role and run.

Enable with ``plugins = ["llm"]`` (``CFN_ENABLE_LLM=1``); settings in ``[llm]``.
Sources, for every accepted result (``cfn_task_result``, re-queued attempts included:
a refused call may still have cost tokens):

* the result's ``usage`` field: ``agent.usage(...)`` calls of a Python handler and the
  ``{"cfn_usage": {...}}`` lines a command printed on stderr (:mod:`cfn_core.usage`);
* with ``[llm] read_json = true`` (the default), the task's value when it is (or ends
  with) the result document of ``claude -p --output-format json`` / ``stream-json``:
  ``total_cost_usd``, ``usage.input_tokens``, ``usage.output_tokens``, ``num_turns``,
  ``session_id``.

It adds every report to the session's ``ctx.usage`` (what ``[limits] budget_usd``
counts), to the prometheus counters ``cfn_llm_cost_usd_total`` and
``cfn_llm_tokens_total{direction="in"|"out"}``, and reports the totals with
``cfn_report`` (the summary; ``--json`` adds per role, per agent and per task).
"""

from __future__ import annotations

import json

from attrs import define
from cfn_core import check_usage, hookimpl, role_of, setting
from prometheus_client import Counter


@define(frozen=True)
class LlmSettings:
    """``[llm]``: cost and token accounting (cfn-llm)."""

    read_json: bool = setting(True, "read the claude -p --output-format json (or stream-json) result document a task's value holds")
    per_task: bool = setting(True, "--json lists each task's figures (and session_id)")


def claude_usage(value) -> tuple[dict, str | None] | None:
    """``(figures, session_id)`` from a ``claude -p`` JSON result document (or a stream-json's last result line)."""
    if isinstance(value, dict):
        doc = value
    elif isinstance(value, str) and "total_cost_usd" in value:
        doc = None
        text = value.strip()
        candidates = [text] if text.startswith("{") and text.endswith("}") else []
        candidates += [line for line in reversed(text.splitlines()) if line.lstrip().startswith("{")]
        for candidate in candidates:
            try:
                parsed = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(parsed, dict) and "total_cost_usd" in parsed:
                doc = parsed
                break
        if doc is None:
            return None
    else:
        return None
    if "total_cost_usd" not in doc:
        return None
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    figures = check_usage(
        {"cost_usd": doc.get("total_cost_usd"), "tokens_in": usage.get("input_tokens"),
         "tokens_out": usage.get("output_tokens"), "turns": doc.get("num_turns")}
    )
    if figures is None:
        return None
    session = doc.get("session_id")
    return figures, session if isinstance(session, str) else None


def _add(total: dict, figures: dict) -> None:
    for key in ("tokens_in", "tokens_out", "cost_usd", "turns"):
        total[key] = total.get(key, 0) + figures.get(key, 0)


class Accounting:
    def __init__(self, ctx, s: LlmSettings):
        self.s = s
        self.run: dict = {}
        self.by_role: dict[str, dict] = {}
        self.by_agent: dict[str, dict] = {}
        self.by_task: dict[str, dict] = {}
        self.reports = 0
        r = ctx.metrics.registry
        self.cost = Counter("cfn_llm_cost_usd", "Dollars the run's tasks reported spending", registry=r)
        self.tokens = Counter("cfn_llm_tokens", "Tokens the run's tasks reported, by direction", ["direction"], registry=r)
        for direction in ("in", "out"):  # exported from the start, at 0
            self.tokens.labels(direction=direction)

    def take(self, ctx, task, agent_id: str, body: dict) -> None:
        figures: dict = {}
        session = None
        if body.get("usage"):
            _add(figures, check_usage(body["usage"]) or {})
        if self.s.read_json and body.get("ok"):
            found = claude_usage(body.get("value"))
            if found is not None:
                _add(figures, found[0])
                session = found[1]
        if not figures:
            return
        self.reports += 1
        ctx.usage.add(figures)
        self.cost.inc(figures.get("cost_usd", 0.0))
        self.tokens.labels(direction="in").inc(figures.get("tokens_in", 0))
        self.tokens.labels(direction="out").inc(figures.get("tokens_out", 0))
        _add(self.run, figures)
        _add(self.by_role.setdefault(role_of(ctx.config, agent_id).name, {}), figures)
        _add(self.by_agent.setdefault(agent_id, {}), figures)
        if self.s.per_task:
            entry = self.by_task.setdefault(task.id, {})
            _add(entry, figures)
            if session:
                entry["session_id"] = session

    def figures(self) -> dict:
        out = {
            "cost_usd": round(self.run.get("cost_usd", 0.0), 6),
            "tokens_in": self.run.get("tokens_in", 0),
            "tokens_out": self.run.get("tokens_out", 0),
            "turns": self.run.get("turns", 0),
            "reports": self.reports,
        }
        for role, f in self.by_role.items():  # flat, so the summary shows them
            out[f"{role}.cost_usd"] = round(f.get("cost_usd", 0.0), 6)
        out["by_role"] = self.by_role
        out["by_agent"] = self.by_agent
        if self.s.per_task:
            out["by_task"] = self.by_task
        return out


@hookimpl
def cfn_settings():
    return {"llm": LlmSettings}


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_LLM",)


@hookimpl
def cfn_session_start(ctx):
    ctx.state["llm"] = Accounting(ctx, ctx.config.section("llm"))
    ctx.usage.sources.append("llm")


@hookimpl
def cfn_task_result(ctx, task, agent_id, outcome, body):
    acc = ctx.state.get("llm")
    if acc is not None:
        acc.take(ctx, task, agent_id, body)


@hookimpl
def cfn_report(ctx):
    acc = ctx.state.get("llm")
    return {"llm": acc.figures()} if acc is not None else None
