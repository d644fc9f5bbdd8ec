"""The baseline: the plan's naive design, kept as the honest reference.

Registered in every process, marked ``trylast``, so any enabled plugin that
implements the same firstresult hook replaces a step:

* spawn: a fresh Python interpreter per agent, one at a time, waiting for each
  to be ready before starting the next;
* send: every message is its own locked append (no buffering);
* route: every inbox in one flat directory, ``inbox/<agent_id>``;
* assign: round robin over the task's role's agents, every task queued at once;
* release: stop the round's agents and wait for them to exit.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .bus.shm import ShmBus
from .hookspecs import hookimpl
from .messages import MalformedMessage, decode
from .process import start_process
from .roles import agent_ids


@hookimpl(trylast=True)
def cfn_bus(config, run_ref):
    # a sender waits at most one task's timeout for room in a full inbox (its reader settles
    # at least one task in that time, or the watchdog replaces it)
    limits = dict(
        max_message_bytes=config.bus.max_message_bytes,
        inbox_depth=config.bus.inbox_depth,
        full_timeout=config.workload.timeout,
    )
    if run_ref is None:
        return ShmBus.create(config.bus.root or None, **limits)
    return ShmBus.attach(run_ref, **limits)


@hookimpl(trylast=True)
def cfn_route(agent_id, config):
    return f"inbox/{agent_id}"


@hookimpl(trylast=True)
def cfn_send(ctx, messages, flush):
    limit = ctx.config.bus.max_message_bytes
    route = ctx.route
    if len(messages) == 1:  # an agent's result: the hot path, one deliver
        msg = messages[0]
        ctx.bus.deliver(msg.dst, route(msg.dst), [msg.encode(limit)])
    else:  # the coordinator's tasks to thousands of agents: their rings go out a slice at a time
        deliver_all(ctx.bus, ((msg.dst, route(msg.dst), [msg.encode(limit)]) for msg in messages))  # encoded one at a time
    return True


def deliver_all(bus, batches) -> None:
    """Deliver each ``(dst, location, records)`` of ``batches`` (an iterable, consumed once):
    with the bus's optional ``deliver_many`` (cfn_core.bus.ManyDeliveries), else one
    ``deliver`` each."""
    many = getattr(bus, "deliver_many", None)
    if many is not None:
        many(batches)
        return
    for dst, location, records in batches:
        bus.deliver(dst, location, records)


@hookimpl(trylast=True)
def cfn_read(ctx, agent_id):
    return decode_records(ctx, agent_id, ctx.bus.read(agent_id, ctx.route(agent_id)))


def decode_records(ctx, agent_id: str, records) -> list:
    """Decode ``(record, receipt)`` pairs; dead-letter (and settle) what is malformed.

    Public so that a plugin replacing ``cfn_read`` keeps the same guarantees.
    """
    limit = ctx.config.bus.max_message_bytes
    out = []
    for raw, receipt in records:
        try:
            if len(raw) > limit:
                raise MalformedMessage(f"record of {len(raw)} bytes exceeds bus.max_message_bytes={limit}")
            msg = decode(raw)
        except MalformedMessage as exc:
            ctx.bus.dead_letter(agent_id, raw, str(exc))
            ctx.bus.ack(agent_id, [receipt])
            ctx.counters["dead_lettered"] += 1
            continue
        msg.receipt = receipt
        out.append(msg)
    return out


@hookimpl(trylast=True)
def cfn_launch_agent(ctx, agent_id):
    cmd = [
        sys.executable,
        "-m",
        "cfn_core.agent",
        "--run",
        ctx.run_ref,
        "--id",
        agent_id,
        "--parent",
        str(os.getpid()),
    ]
    # stdout goes to our stderr: a handler's print must never corrupt `cfn run --json`.
    # start_process: forked from a thread that lasts (the agent's PR_SET_PDEATHSIG follows the
    # forking thread), in its own process group (the terminal's Ctrl-C is ours to handle, from the
    # agent's first instruction on), marked with CFN_RUN for the janitor
    popen = start_process(cmd, run_ref=ctx.run_ref, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), close_fds=True)
    return ctx.new_handle(agent_id, popen.pid, popen=popen)


@hookimpl(trylast=True)
def cfn_spawn(ctx, agent_ids):
    timeout = ctx.config.run.spawn_timeout
    for agent_id in agent_ids:
        handle = ctx.agents.get(agent_id)
        if handle is None or not handle.alive:  # a plugin that failed half way may have launched some
            ctx.launch(agent_id)
        ctx.wait_ready([agent_id], timeout)
    return ctx.spawn_report(agent_ids)


@hookimpl(trylast=True)
def cfn_acquire_agents(ctx, count):
    # agent-0001 ... for the [workload] shorthand; <role>-0001 ... for each [agents.<role>]
    ids = agent_ids(ctx.config, count)
    return ctx.hook.cfn_spawn(ctx=ctx, agent_ids=ids).ready


@hookimpl(trylast=True)
def cfn_assign(ctx, task, agent_ids):
    # the kernel passes the agents of the task's role: one rotation per role, so that a
    # role's agents share its tasks evenly however the roles' tasks interleave
    key = f"builtin.next.{task.role}"
    i = ctx.round_state.get(key, 0)
    ctx.round_state[key] = i + 1
    return agent_ids[i % len(agent_ids)]


@hookimpl(trylast=True)
def cfn_release_agents(ctx, agent_ids):
    ctx.stop_agents(agent_ids)
    return True


@hookimpl(trylast=True)
def cfn_agent_exit(ctx):
    # after every plugin's own cfn_agent_exit (trylast), so their final flushes are counted
    ctx.leave_exit_counters()
