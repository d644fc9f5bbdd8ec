"""Every cfn hook.  This file is the plugin author's manual.

A plugin is a module (or object) with functions named after these hooks and
marked with :data:`cfn_core.hookimpl`; it is published under the entry-point
group ``cfn`` and enabled by listing its entry-point name in ``cfn.toml``'s
``plugins``.  The kernel's baseline implementations are builtin plugins marked
``trylast``, so an enabled plugin replaces a step simply by implementing the
same ``firstresult`` hook and returning something other than ``None``; returning
``None`` hands the step on to the next implementation (ultimately the baseline).

Sides: the *coordinator* is the process that runs ``cfn run`` (or
``Coordinator.run``); an *agent* is a worker process.  Agents load the same
configuration and the same plugins, so a plugin that changes the transport
(routing, batching) acts on both ends.  ``ctx.side`` is ``"coordinator"`` or
``"agent"``.

Context objects (``ctx``) give plugins: ``ctx.config`` (validated
:class:`~cfn_core.config.Config`; your table is ``ctx.config.section(name)``),
``ctx.hook`` (call other hooks), ``ctx.bus`` (the transport, see
:mod:`cfn_core.bus`), ``ctx.route(agent_id)`` (cached ``cfn_route``),
``ctx.metrics`` (the prometheus registry wrapper), ``ctx.state`` (a dict for
plugins' own per-process state, key it by your plugin name) and, on the
coordinator, the agent registry and helpers documented on
:class:`~cfn_core.coordinator.CoordinatorContext`.

If a non-builtin implementation of a firstresult step raises at run time, the
kernel logs it once, counts it and runs the baseline for that call (see
:mod:`cfn_core.plugins`); with ``[run] strict = true`` the error stops the run.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("cfn")
hookimpl = pluggy.HookimplMarker("cfn")


# ---------------------------------------------------------------------- configuration


@hookspec
def cfn_settings():
    """Declare the plugin's own cfn.toml tables.

    :return: ``{"table": SettingsClass}`` where ``SettingsClass`` is an ``attrs``
        class whose fields are declared with :func:`cfn_core.config.setting`
        (default, help, range, extra environment names).  The loader validates
        the table, reads ``CFN_<TABLE>_<KEY>`` and lists the keys in ``cfn init``.

    Called on: both sides, when the configuration is loaded, for every
    *installed* plugin (a table of a disabled plugin is still validated).
    """


@hookspec
def cfn_configure(config):
    """Check the loaded configuration as a whole.

    :param config: the validated :class:`~cfn_core.config.Config`.

    Raise :class:`~cfn_core.errors.ConfigError` naming the key and the allowed
    values for a combination the plugin cannot work with.

    Called on: both sides, once per process, after the plugins are registered.
    """


# ---------------------------------------------------------------------- transport


@hookspec(firstresult=True)
def cfn_bus(config, run_ref):
    """Open the message bus.

    :param config: the configuration.
    :param run_ref: ``None`` on the coordinator (create a new run); on an agent,
        the run reference the coordinator handed it (for the shm bus the run
        directory).
    :return: an object implementing :class:`cfn_core.bus.Bus`.

    Stops at first non-None result.  Baseline: :class:`cfn_core.bus.shm.ShmBus`.
    Called on: both sides, once per process.
    """


@hookspec(firstresult=True)
def cfn_route(agent_id, config):
    """Where ``agent_id``'s inbox lives on the bus.

    :param agent_id: an agent id or ``cfn_core.COORDINATOR_ID``.
    :param config: the configuration.
    :return: a location string for ``bus.deliver``/``bus.read`` (a relative
        path for the shm bus).  Every process must compute the same answer
        without asking anyone (results are cached per process).

    Stops at first non-None result.  Baseline: ``inbox/<agent_id>``, one flat
    directory.  Called on: both sides, for every new destination.
    """


@hookspec(firstresult=True)
def cfn_send(ctx, messages):
    """Put messages on the bus.

    :param ctx: the sender's context.
    :param messages: a list of :class:`~cfn_core.messages.Message`, in send order.
    :return: ``True`` once the messages are accepted.  A plugin that buffers
        must deliver them later (on size, on time, on ``cfn_flush``) and keep
        per-destination order.

    Stops at first non-None result.  Baseline: one locked append per message,
    delivered at once.  Called on: both sides.
    """


@hookspec(firstresult=True)
def cfn_read(ctx, agent_id):
    """Take the new messages of an inbox.

    :param ctx: the reader's context.
    :param agent_id: whose inbox (the reader's own).
    :return: a list of :class:`~cfn_core.messages.Message` with ``receipt`` set;
        the caller passes receipts to ``ctx.bus.ack`` once each message is
        settled.  Malformed records must be dead-lettered, never raised.
        Return everything readable now: an agent reads once per wake-up and
        then sleeps until the bus wakes it again.

    Stops at first non-None result.  Baseline: read the inbox at
    ``cfn_route(agent_id)``, decode, dead-letter what does not decode.
    Called on: both sides, whenever the reader is woken.
    """


@hookspec
def cfn_flush(ctx, reason):
    """Deliver everything buffered now.

    :param ctx: the context.
    :param reason: ``"explicit"`` (before a process sleeps or waits for an
        answer), ``"shutdown"`` (before it exits), or a plugin's own reason.

    The kernel calls it before every sleep, so a message is never held back
    while its sender waits.  Baseline: nothing is buffered.
    Called on: both sides.
    """


# ---------------------------------------------------------------------- agents (coordinator side)


@hookspec
def cfn_session_start(ctx):
    """A :class:`~cfn_core.Coordinator` opened: the bus exists, no round has run.

    Long-lived helpers start here (the pool's zygote and pre-spawned agents).
    Called on: the coordinator.
    """


@hookspec
def cfn_session_finish(ctx):
    """The coordinator is closing: stop every agent and helper you started.

    Called on: the coordinator, before the bus is removed; also after errors
    and interrupts.  Must not leave a process behind.
    """


@hookspec(firstresult=True)
def cfn_launch_agent(ctx, agent_id):
    """Start one agent process; do not wait for it to be ready.

    :param ctx: the coordinator context.
    :param agent_id: the id the agent will read its inbox as.  A replacement
        of a dead agent gets the same id and re-reads what its predecessor left
        unsettled.
    :return: an :class:`~cfn_core.coordinator.AgentHandle` (use
        ``ctx.new_handle(agent_id, pid, popen=None)`` to make it).

    Stops at first non-None result.  Baseline: a fresh Python interpreter
    (``python -m cfn_core.agent``).  cfn-pool forks from a pre-warmed zygote.
    Start processes with ``cfn_core.start_process(cmd, run_ref=ctx.run_ref,
    ...)`` rather than ``subprocess.Popen``: it forks from a thread that lasts
    (the agent's parent-death signal follows the forking thread), in a process
    group of the agent's own (the terminal's Ctrl-C stays the coordinator's) and
    marks the environment so the run's janitor finds what the agent leaves.
    """


@hookspec(firstresult=True)
def cfn_spawn(ctx, agent_ids):
    """Start agents and wait until they are ready (the ready barrier).

    :param ctx: the coordinator context; ``ctx.launch(agent_id)`` calls
        ``cfn_launch_agent`` and registers the handle; ``ctx.wait_ready(ids,
        timeout)`` pumps the bus until those agents answered or died.
    :param agent_ids: the ids to start.
    :return: a :class:`~cfn_core.coordinator.SpawnReport`: which agents are
        ready and, for every one that never became ready, why.

    Stops at first non-None result.  Baseline: one at a time, waiting for
    each to be ready before starting the next.  cfn-parallel starts many at once.
    """


@hookspec(firstresult=True)
def cfn_acquire_agents(ctx, count):
    """Provide ``count`` ready agents for a round.

    :return: a list of agent ids (ready, idle).  May be shorter than ``count``
        when agents could not be started; the round goes on with those.

    Stops at first non-None result.  Baseline: ``agent-0001`` ... via
    ``cfn_spawn``.  cfn-pool takes idle pooled agents and spawns only the misses.
    """


@hookspec(firstresult=True)
def cfn_assign(ctx, task, agent_ids):
    """Choose the agent for a task.

    :param task: the :class:`~cfn_core.messages.Task`.
    :param agent_ids: the round's agents.
    :return: an agent id, or ``False`` to say "no agent is free now; ask again
        when a result arrives".

    Stops at first non-None result.  Baseline: round robin over ``agent_ids``
    (every task is queued at once).  cfn-pool: an idle agent.
    """


@hookspec(firstresult=True)
def cfn_release_agents(ctx, agent_ids):
    """The round is over; its agents are no longer needed by it.

    :return: ``True`` when handled.

    Stops at first non-None result.  Baseline: stop them and wait for them to
    exit.  cfn-pool: return them to the idle pool.
    """


@hookspec
def cfn_agent_started(ctx, agent):
    """An agent answered its ready message.

    :param agent: its :class:`~cfn_core.coordinator.AgentHandle` (``ready_at`` set).
    Called on: the coordinator.
    """


@hookspec
def cfn_agent_exited(ctx, agent, reason):
    """An agent process ended.

    :param agent: its handle (``exit_code`` set when known).
    :param reason: ``"stopped"`` (asked to), ``"died"`` (crashed or killed),
        ``"killed"`` (the coordinator killed it: timeout, health check).

    The kernel replaces an agent that died with work outstanding; plugins
    handle the rest (the pool refills idle ones).  Called on: the coordinator.
    """


@hookspec
def cfn_tick(ctx, now):
    """Periodic call from the coordinator's wait loop (at most every 50 ms while it waits).

    :param now: ``time.monotonic()``.  For health checks and retirement timers.
    """


# ---------------------------------------------------------------------- agent side


@hookspec
def cfn_agent_init(ctx):
    """The agent process is set up (bus open, doorbell bound) and about to say ready.

    Start per-process helpers here (a flusher thread); after a fork this is the
    first hook the new process calls.  Called on: agents.
    """


@hookspec
def cfn_agent_exit(ctx):
    """The agent is about to exit normally (after the final flush).  Called on: agents."""


# ---------------------------------------------------------------------- coordination


@hookspec
def cfn_coordination_start(ctx, round):
    """A round begins (before agents are acquired).

    :param round: the round's number in the session: 1, 2, ... over every ``run`` of
        one coordinator, never restarting (what its messages carry,
        ``RoundResult.session_round``).  Called on: the coordinator.
    """


@hookspec
def cfn_coordination_finish(ctx, result):
    """A round ended.

    :param result: its :class:`~cfn_core.report.RoundResult`.  Called on: the coordinator.
    """


@hookspec
def cfn_report(ctx):
    """Figures for the summary.

    :return: ``{"name": {figure: value}}`` (JSON-able), merged into
        ``CoordinationResult.plugin_figures`` (hit rate, batch sizes, shard balance...).

    Called on: the coordinator, once at the end of ``Coordinator.run``.
    """
