"""cfn-limits: hold tasks back so a swarm respects its provider's limits and its budget.

Enable with ``plugins = ["limits"]`` (``CFN_ENABLE_LIMITS=1``); settings in ``[limits]``
(see :class:`LimitsSettings`, docs/LLM_SWARMS.md).  The plugin only ever says "not now":

* ``cfn_assign`` (``tryfirst``): returns ``False`` while ``max_concurrent`` tasks are in
  flight (counted from the kernel's ``AgentHandle.outstanding``, across the run and per
  role), while the token bucket of ``rate`` is empty, and reports the task not started
  (``ctx.not_started``) once ``budget_usd`` / ``budget_tokens`` is spent
  (``ctx.usage``, which an accounting plugin such as cfn-llm fills).  Otherwise it
  returns ``None`` and the next implementation (cfn-pool's idle agent, the baseline's
  round robin) chooses the agent.  The kernel's dispatch loop pumps the bus and asks
  again, so nothing else of the coordinator changes.
* ``cfn_task_result``: AIMD.  A result re-queued as ``rate_limited`` halves the run's
  effective rate and concurrency (at most once per ``aimd_cooldown``, never below
  ``aimd_floor``); every task done gives back ``aimd_step`` of it.
* ``cfn_configure``: checks the combination (a budget needs an accounting source,
  per-role limits name roles of the run) and warns when ``max_concurrent`` exceeds
  the agents.
* ``cfn_report``: the figures (most tasks in flight seen, tasks held back, rate-limit
  decreases, the lowest rate factor).
"""

from __future__ import annotations

import logging

from cfn_core import ConfigError, hookimpl, roles_of

from .limits import Limits, LimitsSettings, parse_role_limits

log = logging.getLogger("cfn.limits")

#: the accounting plugin a budget counts on (its entry-point name)
ACCOUNTING = "llm"


def _limits(ctx) -> Limits | None:
    return ctx.state.get("limits")


@hookimpl
def cfn_settings():
    return {"limits": LimitsSettings}


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_LIMITS",)


@hookimpl
def cfn_configure(config):
    s = config.section("limits")
    if (s.budget_usd or s.budget_tokens) and ACCOUNTING not in config.enabled():
        key = "budget_usd" if s.budget_usd else "budget_tokens"
        raise ConfigError(
            f"[limits] {key} = {getattr(s, key):g} needs an accounting source: enable the {ACCOUNTING!r} plugin "
            f"(plugins = [..., \"{ACCOUNTING}\"]), which counts what tasks report (claude -p JSON, agent.usage, cfn_usage lines)"
        )
    per_role = parse_role_limits(s.role_max_concurrent)
    roles = roles_of(config)
    for role in per_role:
        if role not in roles:
            raise ConfigError(
                f"[limits] role_max_concurrent: {role!r} is not a role of this run; roles: {', '.join(roles)}"
            )
    agents = config.workload.agents
    if s.max_concurrent and s.max_concurrent > agents:
        log.warning(
            "cfn: warning: [limits] max_concurrent = %d exceeds the run's %d agents: at most %d tasks run at once anyway",
            s.max_concurrent, agents, agents,
        )


@hookimpl
def cfn_session_start(ctx):
    ctx.state["limits"] = Limits(ctx, ctx.config.section("limits"))


@hookimpl(tryfirst=True)
def cfn_assign(ctx, task, agent_ids):
    limits = _limits(ctx)
    return limits.gate(ctx, task) if limits is not None else None


@hookimpl
def cfn_task_result(ctx, task, agent_id, outcome, body):
    limits = _limits(ctx)
    if limits is not None:
        limits.on_result(outcome, body)


@hookimpl
def cfn_report(ctx):
    limits = _limits(ctx)
    return {"limits": limits.figures()} if limits is not None else None
