"""Every cfn hook.  This file is the plugin author's manual.

A plugin is a module (or object) with functions named after these hooks and
marked with :data:`cfn_core.hookimpl`; it is published under the entry-point
group ``cfn`` and enabled by listing its entry-point name in ``cfn.toml``'s
``plugins``.  The kernel's baseline implementations are builtin plugins marked
``trylast``, so an enabled plugin replaces a step simply by implementing the
same ``firstresult`` hook and returning something other than ``None``; returning
``None`` hands the step on to the next implementation (ultimately the baseline).

Two kinds of hooks:

* *Installation hooks* (:func:`cfn_settings`, :func:`cfn_feature_flags`,
  :func:`cfn_add_commands`) describe what an installed plugin brings: its
  cfn.toml tables, the environment variables that switch it on, its ``cfn``
  subcommands.  They are called on every *installed* plugin, enabled or not,
  without registering it, so keep the module cheap to import.
* *Run hooks* (all the others) are called through the plugin manager of one
  process, on the builtins and the *enabled* plugins only.

Sides: the *coordinator* is the process that runs ``cfn run`` (or
``Coordinator.run``); an *agent* is a worker process.  Agents load the same
configuration and the same plugins, so a plugin that changes the transport
(routing, batching) acts on both ends.  ``ctx.side`` is ``"coordinator"`` or
``"agent"``.  A *host* is a process that starts agents for a coordinator on
another machine (``cfn agent`` of a distributed transport); it has no context.

Context objects (``ctx``) give plugins: ``ctx.config`` (validated
:class:`~cfn_core.Config`; your table is ``ctx.config.section(name)``),
``ctx.hook`` (call other hooks), ``ctx.bus`` (the transport, see
:class:`cfn_core.Bus`), ``ctx.route(agent_id)`` (cached ``cfn_route``),
``ctx.metrics`` (the prometheus registry wrapper), ``ctx.state`` (a dict for
plugins' own per-process state, key it by your plugin name) and, on the
coordinator, the agent registry and helpers documented on
:class:`~cfn_core.CoordinatorContext`.

If a non-builtin implementation of a firstresult step raises at run time, the
kernel logs it once, counts it and runs the baseline for that call (see
:mod:`cfn_core.plugins`); with ``[run] strict = true`` the error stops the run.

Every name in the annotations is exported by :mod:`cfn_core` (the public API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import pluggy

if TYPE_CHECKING:  # annotations only: agents import this module and must not pay for these
    import argparse

    from .agent import AgentContext
    from .bus import Bus
    from .config import Config
    from .context import AgentHandle, CoordinatorContext, SpawnReport
    from .forker import AgentForker
    from .messages import Message, Task
    from .report import RoundResult

hookspec = pluggy.HookspecMarker("cfn")
hookimpl = pluggy.HookimplMarker("cfn")


# ---------------------------------------------------------------------- installation


@hookspec
def cfn_settings() -> dict[str, type]:
    """Declare the plugin's own cfn.toml tables.

    :return: ``{"table": SettingsClass}`` where ``SettingsClass`` is an ``attrs``
        class whose fields are declared with :func:`cfn_core.setting`
        (default, help, range, extra environment names).  The loader validates
        the table, reads ``CFN_<TABLE>_<KEY>`` and lists the keys in ``cfn init``.

    Called on: both sides, when the configuration is loaded, for every
    *installed* plugin (a table of a disabled plugin is still validated).
    """


@hookspec
def cfn_feature_flags() -> Sequence[str]:
    """Declare environment variables that switch this plugin on or off.

    :return: variable names, e.g. ``("CFN_ENABLE_TRACING",)``.  Set to a true
        value (``1``, ``true``, ``yes``, ``on``) the variable adds the plugin,
        by the name it is installed under, to the configuration's plugin list;
        set to a false value (``0``, ``false``, ``no``, ``off``, empty) it
        removes it.  Anything else is a configuration error naming the
        variable.  A ``no:name`` anywhere (cfn.toml, ``CFN_PLUGINS``,
        ``CFN_DISABLE_PLUGINS``, ``--plugins``) still wins: a flag never
        re-enables a blocked plugin.  Two installed plugins declaring the same
        variable is an error naming both.

    Called on: the coordinator (and every ``cfn`` command), when the
    configuration is loaded, for every *installed* plugin.
    """


@hookspec
def cfn_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``cfn`` command line.

    :param subparsers: the ``cfn`` parser's subparsers: call
        ``subparsers.add_parser("name", help=...)``, add arguments, and
        ``set_defaults(func=handler)``; ``handler(args)`` returns the exit code.
        Raise :class:`~cfn_core.CfnError` from the handler for a usage or
        configuration error: ``cfn`` prints it as one line and exits 2.

    Import what the command needs inside its handler, not at module level:
    every ``cfn`` invocation builds the parser.  A name that is taken already
    (a kernel command, another plugin's) is reported as a warning and the
    plugin's commands are left out; so is any other failure of this hook.

    Called on: the ``cfn`` command, for every *installed* plugin, enabled or
    not (a command is there as soon as its distribution is installed), and for
    the kernel's own command modules (``cfn bench``).
    """


@hookspec
def cfn_configure(config: Config) -> None:
    """Check the loaded configuration as a whole.

    :param config: the validated :class:`~cfn_core.Config`.

    Raise :class:`~cfn_core.ConfigError` naming the key and the allowed
    values for a combination the plugin cannot work with.

    Called on: both sides, once per process, after the plugins are registered.
    """


# ---------------------------------------------------------------------- transport


@hookspec(firstresult=True)
def cfn_bus(config: Config, run_ref: str | None) -> Bus | None:
    """Open the message bus.

    :param config: the configuration.
    :param run_ref: ``None`` on the coordinator (create a new run); on an agent,
        the run reference the coordinator handed it (for the shm bus the run
        directory).
    :return: an object implementing :class:`cfn_core.Bus`.

    Stops at first non-None result.  Baseline: :class:`cfn_core.ShmBus`.
    A distributed transport (Redis Streams) replaces it.
    Called on: both sides, once per process.
    """


@hookspec(firstresult=True)
def cfn_route(agent_id: str, config: Config) -> str | None:
    """Where ``agent_id``'s inbox lives on the bus.

    :param agent_id: an agent id or ``cfn_core.COORDINATOR_ID``.
    :param config: the configuration.
    :return: a location string for ``bus.deliver``/``bus.read`` (a relative
        path for the shm bus).  Every process must compute the same answer
        without asking anyone (results are cached per process).

    Stops at first non-None result.  Baseline: ``inbox/<agent_id>``, one flat
    directory; a sharding plugin spreads inboxes over several.  Called on:
    both sides, for every new destination.
    """


@hookspec(firstresult=True)
def cfn_send(ctx: CoordinatorContext | AgentContext, messages: list[Message], flush: bool) -> bool | None:
    """Put messages on the bus.

    :param ctx: the sender's context.
    :param messages: a list of :class:`~cfn_core.Message`, in send order.
    :param flush: the caller flushes right after this call (an agent's own
        ``agent.send``/``request``/``reply``, a task's peer messages: a receiver
        may be waiting for them, and an error must surface at the call).  A
        plugin that buffers should then write these messages now, grouped per
        destination after what it holds for each, instead of buffering them for
        the flush that follows (buffering costs and coalesces nothing there).
    :return: ``True`` once the messages are accepted.  A plugin that buffers
        must deliver them later (on size, on time, on ``cfn_flush``) and keep
        per-destination order.

    Stops at first non-None result.  Baseline: one locked append per message,
    delivered at once.  Called on: both sides.
    """


@hookspec(firstresult=True)
def cfn_read(ctx: CoordinatorContext | AgentContext, agent_id: str) -> list[Message] | None:
    """Take the new messages of an inbox.

    :param ctx: the reader's context.
    :param agent_id: whose inbox (the reader's own).
    :return: a list of :class:`~cfn_core.Message` with ``receipt`` set;
        the caller passes receipts to ``ctx.bus.ack`` once each message is
        settled.  Malformed records must be dead-lettered, never raised
        (:func:`cfn_core.decode_records` does both).
        Return everything readable now: an agent reads once per wake-up and
        then sleeps until the bus wakes it again.

    Stops at first non-None result.  Baseline: read the inbox at
    ``cfn_route(agent_id)``, decode, dead-letter what does not decode.
    Called on: both sides, whenever the reader is woken.
    """


@hookspec
def cfn_flush(ctx: CoordinatorContext | AgentContext, reason: str) -> None:
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
def cfn_session_start(ctx: CoordinatorContext) -> None:
    """A :class:`~cfn_core.Coordinator` opened: the bus exists, no round has run.

    Long-lived helpers start here (a fork server, agents spawned ahead of the
    first round, a flusher).  Called on: the coordinator.
    """


@hookspec
def cfn_session_finish(ctx: CoordinatorContext) -> None:
    """The coordinator is closing: stop every agent and helper you started.

    Called on: the coordinator, before the bus is removed; also after errors
    and interrupts.  Must not leave a process behind.
    """


@hookspec(firstresult=True)
def cfn_launch_agent(ctx: CoordinatorContext, agent_id: str) -> AgentHandle | None:
    """Start one agent process; do not wait for it to be ready.

    :param ctx: the coordinator context.
    :param agent_id: the id the agent will read its inbox as.  A replacement
        of a dead agent gets the same id and re-reads what its predecessor left
        unsettled.
    :return: an :class:`~cfn_core.AgentHandle` (use
        ``ctx.new_handle(agent_id, pid, popen=None)`` to make it).

    Stops at first non-None result.  Baseline: a fresh Python interpreter
    (``python -m cfn_core.agent``).  A pooling plugin forks it from a
    pre-warmed process; a distributed transport places it on another machine.
    Start processes with ``cfn_core.start_process(cmd, run_ref=ctx.run_ref,
    ...)`` rather than ``subprocess.Popen``: it forks from a thread that lasts
    (the agent's parent-death signal follows the forking thread), in a process
    group of the agent's own (the terminal's Ctrl-C stays the coordinator's) and
    marks the environment so the run's janitor finds what the agent leaves.
    """


@hookspec(firstresult=True)
def cfn_agent_forker(config: Config, run_ref: str) -> AgentForker | None:
    """Provide a fork server for a host that starts agents without a coordinator.

    :param config: the run's configuration (as the coordinator stored it).
    :param run_ref: the host's local run reference (its spool directory),
        with the run's state already copied in.
    :return: an object implementing :class:`cfn_core.AgentForker` (ready to
        fork), or ``None`` to leave the host to start fresh interpreters.
        Raise if it cannot start; the host then starts fresh interpreters.
        The host closes it when the run ends.

    Stops at first non-None result.  Baseline: none (fresh interpreters).
    A pooling plugin that forks agents from a warm process on the
    coordinator offers the same on every host.
    Called on: a host (``cfn agent``), once, with the run's enabled plugins.
    """


@hookspec(firstresult=True)
def cfn_spawn(ctx: CoordinatorContext, agent_ids: list[str]) -> SpawnReport | None:
    """Start agents and wait until they are ready (the ready barrier).

    :param ctx: the coordinator context; ``ctx.launch(agent_id)`` calls
        ``cfn_launch_agent`` and registers the handle; ``ctx.wait_ready(ids,
        timeout)`` pumps the bus until those agents answered or died.
    :param agent_ids: the ids to start.
    :return: a :class:`~cfn_core.SpawnReport`: which agents are
        ready and, for every one that never became ready, why.

    Stops at first non-None result.  Baseline: one at a time, waiting for
    each to be ready before starting the next.  A concurrent-spawning plugin
    keeps many starting at once.
    """


@hookspec(firstresult=True)
def cfn_acquire_agents(ctx: CoordinatorContext, count: int) -> list[str] | None:
    """Provide ``count`` ready agents for a round.

    :return: a list of agent ids (ready, idle).  May be shorter than ``count``
        when agents could not be started; the round goes on with those.  With
        roles (``[agents.<role>]``) ``count`` is their total and the agents must be
        each role's count of its own (``<role>-0001`` ...: an agent's role is read
        from its id, :func:`cfn_core.role_of`).

    Stops at first non-None result.  Baseline: ``agent-0001`` ... via
    ``cfn_spawn``.  A pooling plugin takes idle agents it kept and spawns only
    the misses.
    """


@hookspec(firstresult=True)
def cfn_assign(ctx: CoordinatorContext, task: Task, agent_ids: list[str]) -> str | Literal[False] | None:
    """Choose the agent for a task.

    :param task: the :class:`~cfn_core.Task` (``task.role`` filled in).
    :param agent_ids: the round's agents of the task's role.
    :return: an agent id, or ``False`` to say "no agent is free now; ask again
        when a result arrives".

    Stops at first non-None result.  Baseline: round robin over ``agent_ids``
    (every task is queued at once).  A pooling plugin: an agent with room,
    ``ctx.has_room(handle)`` (fewer than ``[workload] prefetch`` tasks outstanding;
    1: an idle agent).  ``Coordinator.submit``'s feed calls it too, once per task,
    and on ``False`` asks again after the next result, submission or tick.  A limit
    (of a rate, a concurrency) implements it ``tryfirst``: ``False`` holds the task
    back, ``None`` lets the next implementation choose; to drop a task for good (a
    budget) call ``ctx.not_started(task, reason)`` and return ``False``.  Also called
    for tasks the failure policy re-queues (``cfn_task_result`` outcome
    ``"requeued"``), once their backoff is over.
    """


@hookspec(firstresult=True)
def cfn_release_agents(ctx: CoordinatorContext, agent_ids: list[str]) -> bool | None:
    """The round is over; its agents are no longer needed by it.

    :return: ``True`` when handled.

    Stops at first non-None result.  Baseline: stop them and wait for them to
    exit.  A pooling plugin keeps them idle for the next round.
    """


@hookspec
def cfn_agent_started(ctx: CoordinatorContext, agent: AgentHandle) -> None:
    """An agent answered its ready message.

    :param agent: its :class:`~cfn_core.AgentHandle` (``ready_at`` set).
    Called on: the coordinator.
    """


@hookspec
def cfn_agent_exited(ctx: CoordinatorContext, agent: AgentHandle, reason: str) -> None:
    """An agent process ended.

    :param agent: its handle (``exit_code`` set when known).
    :param reason: ``"stopped"`` (asked to), ``"died"`` (crashed or killed),
        ``"killed"`` (the coordinator killed it: timeout, health check).

    The kernel replaces an agent that died with work outstanding; plugins
    handle the rest (a pooling plugin refills its idle agents).  Called on:
    the coordinator.
    """


@hookspec
def cfn_task_result(ctx: CoordinatorContext, task: Task, agent_id: str, outcome: str, body: dict[str, Any]) -> None:
    """A result of a task arrived and was accepted (what accounting and rate limits watch).

    :param task: the :class:`~cfn_core.Task`.
    :param agent_id: the agent that ran it.
    :param outcome: ``"done"``, ``"failed"`` (final), or ``"requeued"`` (the failure
        policy retries it: ``body["failure"]`` says why, e.g. ``"rate_limited"``).
    :param body: the result record's body as the agent sent it (already checked):
        ``ok``, ``value``, ``error``, ``seconds``, and when present ``failure``
        (``rate_limited``, ``retry``, ``fatal``, ``timeout``, ``stalled``, ``oom``),
        ``retry_after`` and ``usage`` (``{"tokens_in", "tokens_out", "cost_usd",
        "turns"}``, see :mod:`cfn_core.usage`).  Do not change it.

    Called on: the coordinator, once per result, in arrival order.
    """


@hookspec
def cfn_tick(ctx: CoordinatorContext, now: float) -> None:
    """Periodic call from the coordinator's wait loop (at most every 50 ms while it waits).

    :param now: ``time.monotonic()``.  For health checks and retirement timers.
    """


# ---------------------------------------------------------------------- agent side


@hookspec
def cfn_agent_init(ctx: AgentContext) -> None:
    """The agent process is set up (bus open, doorbell bound) and about to say ready.

    Start per-process helpers here (a flusher thread); after a fork this is the
    first hook the new process calls.  Called on: agents.
    """


@hookspec
def cfn_agent_exit(ctx: AgentContext) -> None:
    """The agent is about to exit normally (after the final flush).  Called on: agents."""


# ---------------------------------------------------------------------- coordination


@hookspec
def cfn_coordination_start(ctx: CoordinatorContext, round: int) -> None:
    """A round begins (before agents are acquired).

    :param round: the round's number in the session: 1, 2, ... over every ``run`` of
        one coordinator, never restarting (what its messages carry,
        ``RoundResult.session_round``).  Called on: the coordinator.
    """


@hookspec
def cfn_coordination_finish(ctx: CoordinatorContext, result: RoundResult) -> None:
    """A round ended.

    :param result: its :class:`~cfn_core.RoundResult`.  Called on: the coordinator.
    """


@hookspec
def cfn_report(ctx: CoordinatorContext) -> dict[str, dict[str, Any]] | None:
    """Figures for the summary.

    :return: ``{"name": {figure: value}}`` (JSON-able), merged into
        ``CoordinationResult.plugin_figures`` (hit rate, batch sizes, shard balance...).

    Called on: the coordinator, once at the end of ``Coordinator.run``.
    """
