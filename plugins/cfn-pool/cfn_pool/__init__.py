"""cfn-pool: pre-spawned agents that wait idle, take work at once and are reused across rounds.

Enable with ``plugins = ["pool"]``; settings in ``[pool]`` (see :class:`PoolSettings`).

Hook implementations (all coordinator side; agents only load the settings):

* ``cfn_session_start``: start the zygote (:mod:`cfn_pool.zygote`), a warm
  process that forks agents with the interpreter, cfn_core, the plugins and the
  handler already imported; then pre-spawn ``size`` agents through
  ``cfn_spawn`` (so cfn-parallel, when enabled, spawns them concurrently).
* ``cfn_launch_agent``: fork the agent from the zygote (any agent of the
  session, including the kernel's replacement of a dead agent under its id).
* ``cfn_acquire_agents``: idle pooled agents first (hits, health-checked),
  ``cfn_spawn`` only for the misses (the pool grows on demand).
* ``cfn_assign``: a task goes to an agent of the round (of the task's role)
  with nothing outstanding; ``False`` when all are busy, so the kernel waits
  for a result.  With roles, ``size`` and ``min_size`` are shared out over the
  roles by their counts, and the zygote forks each role's agents with that
  role's handler.
* ``cfn_release_agents``: the round's agents go back to the idle pool.
* ``cfn_agent_started`` / ``cfn_agent_exited`` / ``cfn_tick``: refill below
  ``min_size``, retire idle agents older than ``max_idle``, ping idle agents
  and replace the ones that do not answer.
* ``cfn_session_finish``: drain everything, zygote included.
* ``cfn_agent_forker``: a zygote for a host that starts agents for the run
  (``cfn agent`` of a distributed bus), so they fork there too.
* ``cfn_feature_flags``: ``CFN_ENABLE_POOLING``.
* ``cfn_report``: hit rate, refills, retirements, init and assignment times.
"""

from __future__ import annotations

from attrs import define
from cfn_core import ConfigError, ensure_fds_for_agents, hookimpl, setting

NAME = "pool"


@define(frozen=True)
class PoolSettings:
    """``[pool]``: pre-spawned agents, reused across rounds (cfn-pool)."""

    size: int = setting(20, "agents pre-spawned when the session opens", env=("CFN_POOL_SIZE",), min=0, max=1_000_000)
    min_size: int = setting(
        -1,
        "refill the pool when fewer agents than this are alive; -1: same as size",
        env=("CFN_POOL_MIN_SIZE",),
        min=-1,
        max=1_000_000,
    )
    max_idle: float = setting(
        300.0,
        "seconds an idle agent may wait for work before it is retired (the pool shrinks back to min_size)",
        env=("CFN_POOL_MAX_IDLE",),
        min=0.001,
        max=1e9,
    )
    warmup_timeout: float = setting(
        30.0,
        "seconds the initial fill may take (checked between chunks of 256); the rest is spawned on demand",
        env=("CFN_POOL_WARMUP_TIME",),
        min=0.01,
        max=3600.0,
    )
    zygote: bool = setting(
        True, "fork agents from a pre-warmed zygote process; false: a fresh interpreter per agent (the baseline launcher)"
    )
    forkers: int = setting(
        0, "processes forking agents in parallel (the zygote and copies of it); 0: one per CPU, at most 4", min=0, max=64
    )
    fork_ahead: int = setting(
        16, "fork requests the zygote gets ahead of the spawn's launches (pipelining); 1: one at a time", min=1, max=10_000
    )
    sched_batch: bool = setting(
        False, "agents run under SCHED_BATCH (Linux): a woken agent does not preempt the coordinator's burst of sends"
    )
    health_interval: float = setting(
        5.0, "idle agents not heard from for this many seconds are pinged before they get work", min=0.0, max=1e9
    )
    health_timeout: float = setting(
        1.0, "seconds an idle agent has to answer a ping before it is killed and replaced", min=0.001, max=3600.0
    )

    @property
    def floor(self) -> int:
        """The effective min_size."""
        return self.size if self.min_size < 0 else self.min_size


@hookimpl
def cfn_settings():
    return {NAME: PoolSettings}


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_POOLING",)


@hookimpl
def cfn_configure(config):
    if NAME not in config.enabled():
        return
    s = config.section(NAME)
    if s.size > config.run.max_agents:  # the pool starts its agents itself: the kernel's guard must hold for them too
        raise ConfigError(
            f"[pool] size = {s.size} exceeds [run] max_agents = {config.run.max_agents}; "
            "raise max_agents if you mean it, or make the pool smaller"
        )
    if s.min_size > s.size:
        raise ConfigError(
            f"[pool] min_size = {s.min_size} is larger than [pool] size = {s.size}: "
            "min_size must be between 0 and size (or -1 for the same as size)"
        )


def _pool(ctx):
    return ctx.state.get(NAME)


@hookimpl
def cfn_session_start(ctx):
    from .pool import Pool

    settings = ctx.config.section(NAME)
    # the kernel raised the fd limit for [workload] agents; the pool may hold more (before any agent starts)
    ensure_fds_for_agents(max(settings.size, ctx.config.workload.agents), f"[pool] size = {settings.size}")
    pool = ctx.state[NAME] = Pool(ctx, settings)
    pool.start(ctx)


@hookimpl
def cfn_session_finish(ctx):
    pool = _pool(ctx)
    if pool is not None:
        pool.drain(ctx)


@hookimpl
def cfn_launch_agent(ctx, agent_id):
    pool = _pool(ctx)
    return pool.launch(ctx, agent_id) if pool is not None else None


@hookimpl
def cfn_acquire_agents(ctx, count):
    pool = _pool(ctx)
    return pool.acquire(ctx, count) if pool is not None else None


@hookimpl
def cfn_assign(ctx, task, agent_ids):
    pool = _pool(ctx)
    return pool.assign(ctx, task, agent_ids) if pool is not None else None


@hookimpl
def cfn_release_agents(ctx, agent_ids):
    pool = _pool(ctx)
    return pool.release(ctx, agent_ids) if pool is not None else None


@hookimpl
def cfn_agent_started(ctx, agent):
    pool = _pool(ctx)
    if pool is not None:
        pool.started(ctx, agent)


@hookimpl
def cfn_agent_exited(ctx, agent, reason):
    pool = _pool(ctx)
    if pool is not None:
        pool.exited(ctx, agent, reason)


@hookimpl
def cfn_tick(ctx, now):
    pool = _pool(ctx)
    if pool is not None:
        pool.tick(ctx, now)


@hookimpl
def cfn_report(ctx):
    pool = _pool(ctx)
    return {NAME: pool.figures()} if pool is not None else None


@hookimpl
def cfn_agent_forker(config, run_ref):
    settings = config.section(NAME)
    if not settings.zygote:
        return None
    import os

    from .zygote import Zygote

    forkers = settings.forkers or min(4, os.cpu_count() or 1)
    return Zygote(run_ref, start_timeout=settings.warmup_timeout, forkers=forkers)
