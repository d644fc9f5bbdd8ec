"""cfn-parallel: start many agents at once instead of one at a time.

Enable with ``plugins = ["parallel"]``; settings in ``[parallel]`` (see
:class:`ParallelSettings`).

Hook implementations (coordinator side; agents only load the settings):

* ``cfn_spawn``: keeps up to ``parallelism`` agents starting at the same time
  through ``ctx.launch`` (so whichever ``cfn_launch_agent`` is enabled, e.g.
  cfn-pool's zygote, does the starting), pumps the bus for ready messages,
  retries a spawn that failed or timed out with exponential backoff up to
  ``max_retry`` times, and reports the agents that never became ready.  The
  window shrinks when the machine is busy (CPU, load average, memory) and
  drops to one at a time after repeated failures.  Before anything starts,
  RLIMIT_NOFILE, RLIMIT_NPROC and the kernel's pid limit are checked
  (:class:`cfn_core.ResourceLimitError` with the numbers when N agents cannot fit).
* ``cfn_agent_started`` / ``cfn_agent_exited``: events for the spawn loop.
* ``cfn_feature_flags``: ``CFN_ENABLE_PARALLEL_SPAWN``.
* ``cfn_report``: spawn figures (attempts, retries, failures, window, CPU and
  load during the burst).

Everything runs on the coordinator's main thread: no spawning from helper
threads, because ``PR_SET_PDEATHSIG`` fires when the parent *thread* exits.
"""

from __future__ import annotations

from attrs import define
from cfn_core import hookimpl, setting

NAME = "parallel"


@define(frozen=True)
class ParallelSettings:
    """``[parallel]``: concurrent agent spawning (cfn-parallel)."""

    parallelism: int = setting(
        50, "agents starting at the same time (the window)", env=("CFN_SPAWN_PARALLELISM",), min=1, max=100_000
    )
    max_retry: int = setting(
        3, "retries of an agent that failed to start or timed out", env=("CFN_SPAWN_MAX_RETRY",), min=0, max=100
    )
    timeout: float = setting(
        5.0, "seconds one agent may take from launch to ready", env=("CFN_SPAWN_TIMEOUT",), min=0.01, max=3600.0
    )
    init_timeout: float = setting(
        120.0,
        "seconds the whole ready barrier of one spawn may take; agents not ready by then are reported",
        env=("CFN_SPAWN_INIT_TIMEOUT",),
        min=0.01,
        max=86_400.0,
    )
    backoff: float = setting(0.05, "seconds before the first retry, doubled at every further attempt", min=0.0, max=60.0)
    throttle: bool = setting(True, "shrink the window while CPU, load average or memory are under pressure")
    max_cpu_percent: float = setting(
        90.0, "machine CPU use above which the window is halved", min=1.0, max=100.0
    )
    max_load: float = setting(
        2.0, "1-minute load average per CPU above which the window is halved", min=0.01, max=1000.0
    )
    min_window: int = setting(
        0, "the throttle never shrinks the window below this; 0: 4 per CPU", min=0, max=100_000
    )
    min_free_memory_percent: float = setting(
        5.0, "below this much available memory agents start one at a time", min=0.0, max=100.0
    )
    sequential_after: int = setting(
        5, "consecutive failed starts after which spawning falls back to one at a time; 0: never", min=0, max=100_000
    )


@hookimpl
def cfn_settings():
    return {NAME: ParallelSettings}


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_PARALLEL_SPAWN",)


def _state(ctx):
    st = ctx.state.get(NAME)
    if st is None:
        from .spawner import SpawnState

        st = ctx.state[NAME] = SpawnState(ctx)
    return st


@hookimpl
def cfn_spawn(ctx, agent_ids):
    from .spawner import spawn

    return spawn(ctx, _state(ctx), list(agent_ids))


@hookimpl
def cfn_agent_started(ctx, agent):
    st = ctx.state.get(NAME)
    if st is not None and st.active:
        st.events.append(agent.id)


@hookimpl
def cfn_agent_exited(ctx, agent, reason):
    st = ctx.state.get(NAME)
    if st is not None and st.active:
        st.events.append(agent.id)


@hookimpl
def cfn_report(ctx):
    st = ctx.state.get(NAME)
    return {NAME: st.figures()} if st is not None else None
