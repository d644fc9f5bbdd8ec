"""Roles: the kinds of agents of a run, and which agent is of which.

A run's agents are of one or more *roles*.  ``cfn.toml`` declares them as
``[agents.<role>]`` tables (``count``, ``handler`` or ``command``, ``timeout``,
``max_attempts``); without any, ``[workload]`` is the shorthand for one role
named ``worker`` with ``[workload] agents`` agents, which is how every run
worked before roles existed (nothing changes for it: its agents are still
``agent-0001`` ...).

An agent's role follows from its id, on every side and on every host, with no
lookup: a role's agents are ``<role>-0001``, ``<role>-0002``, ... (role names
cannot end in ``-<digits>``, so the split is unambiguous).  Any other id (the
shorthand's ``agent-0001`` and cfn-pool's ``pool-00001``, a plugin's or a test's
own ids) is of the default role: the one untagged tasks go to.  So the agent
process, a zygote forking it, and a remote host need nothing but the run's
configuration (which the coordinator stores for its agents) and the id.

Resolved settings (a role inherits what it does not set from ``[workload]``)
are :class:`Role` objects: what :func:`cfn_core.agent.load_handler` takes.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterable, Mapping

from attrs import define

from .errors import ConfigError, did_you_mean

#: the role of the ``[workload]`` shorthand
SHORTHAND_ROLE = "worker"


@define(frozen=True)
class Role:
    """One role with every setting resolved (``[agents.<name>]`` over ``[workload]``).

    :param declared: it comes from an ``[agents.<name>]`` table (False: the shorthand).
    """

    name: str
    count: int
    handler: str
    command: str
    timeout: float
    max_attempts: int
    directory: str
    declared: bool = True
    #: the ``[workload]`` settings whose failure policy its commands follow (``retry_on_exit``,
    #: ``stall_seconds``, ``command_max_rss_mb``...; docs/LLM_SWARMS.md)
    policy: Any = None
    #: ``process`` (an OS process per agent) or ``async`` (asyncio tasks in host processes)
    host: str = "process"
    #: host processes of an async role (resolved: at least 1)
    hosts: int = 1

    @property
    def label(self) -> str:
        """Where its handler and command are set, for error messages: ``[agents.coder]`` or ``[workload]``."""
        return f"[agents.{self.name}]" if self.declared else "[workload]"

    def agent_id(self, number: int) -> str:
        """The id of its ``number``-th agent (from 1): ``coder-0001``; ``agent-0001`` for the shorthand."""
        return f"{self.name if self.declared else 'agent'}-{number:04d}"


_cache: dict[int, tuple[weakref.ref, dict[str, Role]]] = {}


def roles_of(config) -> dict[str, Role]:
    """``{name: Role}`` of a configuration, in the order its file declares them.

    Computed once per configuration object (the coordinator's watchdog asks for
    every agent, every tick).
    """
    key = id(config)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is config:
        return hit[1]
    w = config.workload
    if not config.roles:
        roles = {
            SHORTHAND_ROLE: Role(
                name=SHORTHAND_ROLE,
                count=w.agents,
                handler=w.handler,
                command=w.command,
                timeout=w.timeout,
                max_attempts=w.max_attempts,
                directory=w.directory,
                declared=False,
                policy=w,
                host=w.host,
                hosts=_hosts(w.hosts),
            )
        }
    else:
        roles = {}
        for name, r in config.roles.items():
            inherit = not r.handler and not r.command  # neither set: [workload]'s handler or command
            roles[name] = Role(
                name=name,
                count=r.count,
                handler=w.handler if inherit else r.handler,
                command=w.command if inherit else r.command,
                timeout=r.timeout or w.timeout,
                max_attempts=r.max_attempts or w.max_attempts,
                directory=w.directory,
                policy=w,
                host=r.host or w.host,
                hosts=_hosts(r.hosts or w.hosts),
            )
    for stale in [k for k, (ref, _) in _cache.items() if ref() is None]:
        del _cache[stale]
    _cache[key] = (weakref.ref(config), roles)
    return roles


def _hosts(setting: int) -> int:
    """Host processes for ``hosts = setting`` (0: one per core this process may run on)."""
    if setting:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def process_agents(config) -> int:
    """Agents of the run that are OS processes (``host = "process"``): what the coordinator needs descriptors for.

    Hosted agents cost the coordinator none (their hosts: one pidfd each).
    """
    roles = roles_of(config).values()
    hosts = sum(r.hosts for r in roles if r.host == "async")
    return hosts + sum(r.count for r in roles if r.host != "async")


def default_role(config) -> str:
    """The role of a task that names none: ``[workload] default_role``, else the first role."""
    return config.workload.default_role or next(iter(roles_of(config)))


def role_of(config, agent_id: str) -> Role:
    """The role of agent ``agent_id``: ``<role>-<digits>`` of a declared role, else the default role."""
    roles = roles_of(config)
    if config.roles:
        name, sep, number = agent_id.rpartition("-")
        if sep and number.isdigit():
            role = roles.get(name)
            if role is not None:
                return role
    return roles[default_role(config)]


def check_role(config, role: Any, what: str) -> str:
    """``role`` if it is a role of the run, else a ConfigError naming ``what`` and the known roles."""
    roles = roles_of(config)
    if role not in roles:
        hint = did_you_mean(role, roles) if isinstance(role, str) else ""
        raise ConfigError(f"{what}: role {role!r} is not a role of this run{hint}; roles: {', '.join(roles)}")
    return role


def share_out(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """``total`` shared out in proportion to ``weights`` (largest remainder; the parts add up to ``total``).

    Used to spread generated tasks and a pool's size over the roles by their counts.
    """
    whole = sum(weights.values())
    if not whole:
        return {k: 0 for k in weights}
    parts = {k: total * w // whole for k, w in weights.items()}
    left = total - sum(parts.values())
    by_remainder = sorted(weights, key=lambda k: (-(total * weights[k] % whole), list(weights).index(k)))
    for k in by_remainder[:left]:
        parts[k] += 1
    return parts


def counts(config) -> dict[str, int]:
    """``{role: count}``."""
    return {name: role.count for name, role in roles_of(config).items()}


def agent_ids(config, count: int | None = None) -> list[str]:
    """The ids of a round's agents, role by role: every role's ``count`` of them.

    :param count: another number of agents in all (the shorthand: ``agent-0001`` ..
        ``agent-<count>``; with roles it is shared out by :func:`share_out`).
    """
    roles = roles_of(config)
    per_role = counts(config) if count is None else share_out(count, counts(config))
    return [roles[name].agent_id(i) for name, n in per_role.items() for i in range(1, n + 1)]


def by_role(config, ids: Iterable[str]) -> dict[str, list[str]]:
    """``{role: [agent ids]}`` of ``ids`` (every role present, in declaration order; order kept)."""
    out: dict[str, list[str]] = {name: [] for name in roles_of(config)}
    for agent_id in ids:
        out[role_of(config, agent_id).name].append(agent_id)
    return out


def _entry(config, handle) -> dict:
    entry = {"role": role_of(config, handle.id).name}
    host = handle.info.get("host")
    if host is not None:  # a hosted agent (docs/HOSTING.md): the host process that runs it
        entry["host"] = host
    return entry


def directory_document(ctx) -> dict:
    """The run's directory (bus state ``directory``, docs/USER_GUIDE.md "Roles"): who is in the run.

    ``{"v": 1, "agents": {id: {"role": role}}, "roles": [names]}`` over the session's
    reachable agents, ids sorted: the ready ones (a pool's idle agents included), those
    asked to stop, and those being replaced after a death (a replacement re-reads what
    was sent to its predecessor, so it stays addressable).  ``roles`` lists every role of
    the run, those whose agents are not ready too, so a reader can tell a role that has
    no agent now from a name that is no role at all.
    """
    config = ctx.config
    ready = sorted(
        h.id
        for h in ctx.agents.values()
        if h.state in ("ready", "stopping") or (h.state == "starting" and h.incarnation > 1)
    )
    # an agent's entry depends only on its id and its host: kept between writes (10,000 agents)
    cache = ctx.directory_entries
    agents = {}
    for agent_id in ready:
        entry = cache.get(agent_id)
        if entry is None or entry.get("host") != ctx.agents[agent_id].info.get("host"):
            entry = cache[agent_id] = _entry(config, ctx.agents[agent_id])
        agents[agent_id] = entry
    return {"v": 1, "agents": agents, "roles": list(roles_of(config))}
