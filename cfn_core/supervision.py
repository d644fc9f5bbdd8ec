"""What the coordinator does when an agent ends, stalls or overruns.

:class:`Supervisor` handles every agent exit the event loop sees (a pidfd became
readable, or a transport plugin reported a remote agent's end through
:meth:`CoordinatorContext.reap`): a death with work outstanding charges the task that
was running an attempt and relaunches the agent under its id, so the new incarnation
re-reads what its predecessor had not settled; after ``max_attempts`` the task fails
and the agent is told to skip it (the give-up list, per session-wide round).  Its
watchdog kills agents whose task overran ``timeout`` and handlers silent for
``stall_seconds``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

from .messages import TaskResult
from .roles import role_of

if TYPE_CHECKING:
    from .context import AgentHandle, CoordinatorContext

log = logging.getLogger("cfn")


class Supervisor:
    """Agent exits, recovery of their work, the task watchdog (one per coordinator context)."""

    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx

    def on_exit(self, handle: AgentHandle) -> None:
        ctx = self.ctx
        if handle.pidfd is not None:
            try:
                ctx._selector.unregister(handle.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(handle.pidfd)
            handle.pidfd = None
        if handle.popen is not None:
            handle.exit_code = handle.popen.wait()
        was = handle.state
        handle.state = "exited"
        ctx.exits += 1
        reason = "stopped" if was == "stopping" and not handle.killed_reason else "killed" if handle.killed_reason else "died"
        ctx.metrics.agents.dec()
        ctx.metrics.agent_exits.labels(reason=reason).inc()
        ctx.events.emit("agent_exited", agent=handle.id, pid=handle.pid, reason=reason, exit_code=handle.exit_code, why=handle.killed_reason)
        ctx.hook.cfn_agent_exited(ctx=ctx, agent=handle, reason=reason)
        if reason != "stopped" and handle.outstanding and ctx._round is not None:
            self.recover(handle)
        elif handle.info.pop("recycling", None) is not None and reason == "stopped":
            self.replace_recycled(handle)

    def recover(self, handle: AgentHandle) -> None:
        """An agent died with work outstanding: charge the task it was running, relaunch it."""
        ctx = self.ctx
        r = ctx._round
        stale = [t for t in handle.outstanding if t not in r.tasks or t in r.results]
        for t in stale:
            del handle.outstanding[t]
        if handle.info.pop("cancelled_kill", None) is not None:
            # killed because a cancelled task did not stop: the tasks it held besides are not to
            # blame (no attempt charged), and the agent is replaced even if it held nothing else
            r.result.retries += len(handle.outstanding)
            for task_id in handle.outstanding:
                ctx.events.emit("task_retried", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id] + 1, reason=handle.killed_reason)
            try:
                ctx.launch(handle.id)
            except Exception as exc:
                for task_id in list(handle.outstanding):
                    self.give_up(handle, task_id, f"agent {handle.id} was killed and could not be replaced: {exc}")
            return
        culprit = next(iter(handle.outstanding))
        r.attempts[culprit] += 1
        why = handle.killed_reason or (
            f"agent {handle.id} died" + (f" with status {handle.exit_code}" if handle.exit_code is not None else "")
        )
        if r.attempts[culprit] >= role_of(ctx.config, handle.id).max_attempts:  # its role's, else [workload]'s
            self.give_up(handle, culprit, f"gave up after {r.attempts[culprit]} attempts: {why}")
        if not handle.outstanding:
            if r.distributing:
                # tasks still wait for an agent (a plugin that hands them out one per idle agent):
                # without this one the round could be left with none and wait for ever
                try:
                    ctx.launch(handle.id)
                except Exception as exc:
                    log.warning("agent %s died and could not be replaced: %s", handle.id, exc)
            return
        r.result.retries += len(handle.outstanding)
        ctx.metrics.task_retries.inc(len(handle.outstanding))
        for task_id in handle.outstanding:
            ctx.events.emit("task_retried", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id] + 1, reason=why)
        try:
            ctx.launch(handle.id)
        except Exception as exc:  # cannot replace it: everything it held fails, with the reason
            for task_id in list(handle.outstanding):
                self.give_up(handle, task_id, f"agent {handle.id} died and could not be replaced: {exc}")

    def give_up(self, handle: AgentHandle, task_id: str, reason: str) -> None:
        ctx = self.ctx
        r = ctx._round
        handle.outstanding.pop(task_id, None)
        if task_id not in r.results:
            r.settle(task_id, TaskResult(task=task_id, ok=False, error=reason, agent=handle.id, attempts=r.attempts[task_id], answered=False))
        ctx.metrics.task_failures.inc()
        ctx.events.emit("task_failed", task=task_id, round=r.number, agent=handle.id, attempt=r.attempts[task_id], seconds=None, latency=None, error=reason)
        # keyed by the session-wide round (see cfn_core.agent.read_skip_list): a later run
        # that submits the same task id gets it run again
        key = f"skip.{handle.id}"
        try:
            skip = json.loads(ctx.bus.get_state(key) or b"{}")
        except ValueError:
            skip = {}
        if not isinstance(skip, dict):
            skip = {}
        skip[str(r.number)] = sorted(set(skip.get(str(r.number), [])) | {task_id})
        ctx.bus.put_state(key, json.dumps(skip).encode())

    def replace_recycled(self, handle: AgentHandle) -> None:
        """Start the successor of a recycled agent under its id: it re-reads what its predecessor left queued."""
        ctx = self.ctx
        if ctx._round is None and not handle.outstanding:
            return  # between rounds: a pool refills as it does for any agent that left
        try:
            ctx.launch(handle.id)
        except Exception as exc:
            log.warning("recycled agent %s could not be replaced: %s", handle.id, exc)
            if handle.outstanding and ctx._round is not None:
                for task_id in list(handle.outstanding):
                    self.give_up(handle, task_id, f"agent {handle.id} was recycled and could not be replaced: {exc}")

    def watchdog(self, now: float) -> None:
        """Kill agents whose oldest task has run longer than ``[workload] timeout``.

        A task's time runs from when its agent was ready for it: an agent still starting
        (the replacement of one that died, which inherits its tasks) is held to
        ``[run] spawn_timeout`` instead, so a slow start-up on a loaded machine is not
        charged to the tasks it inherited.
        """
        ctx = self.ctx
        if ctx._round is None:
            return
        spawn_limit = ctx.config.run.spawn_timeout
        for handle in ctx.agents.values():
            if not handle.outstanding or not handle.alive or handle.killed_reason:
                continue
            if handle.state == "starting":
                if now - handle.launched_at > spawn_limit:
                    ctx.kill(handle, f"not ready within {spawn_limit:g}s")
                continue
            role = role_of(ctx.config, handle.id)  # its role's timeout, else [workload]'s
            limit = role.timeout
            # a command agent enforces the timeout itself (it kills the command's process
            # group and reports its stderr): give it time to do so before killing the
            # agent, which would orphan the command and lose the stderr
            grace = max(1.0, 0.25 * limit) if role.command else 0.0
            oldest_task, sent = next(iter(handle.outstanding.items()))
            started = max(sent, handle.last_seen, handle.ready_at or 0.0)
            if now - started > limit + grace:
                ctx.kill(handle, f"task {oldest_task} exceeded the {limit:g}s timeout")
            elif ctx.config.workload.stall_seconds and not role.command:  # a command's agent watches its output itself
                self.check_stall(handle, oldest_task, now - started)

    def check_stall(self, handle: AgentHandle, task_id: str, silent: float) -> None:
        """A handler's agent silent (no status, no message to the coordinator) for ``stall_seconds``:
        marked stalled, then killed ``stall_kill_seconds`` later (its task is retried, an attempt)."""
        ctx = self.ctx
        w = ctx.config.workload
        if silent < w.stall_seconds:
            handle.info.pop("stalled", None)
            return
        if handle.info.get("stalled") != task_id:
            handle.info["stalled"] = task_id
            handle.info["status"] = {"text": "stalled", "fields": {"task": task_id, "silent_seconds": round(silent, 3)}}
            ctx.note_status(handle)
        if silent >= w.stall_seconds + w.stall_kill_seconds:
            ctx.kill(
                handle,
                f"task {task_id} stalled: no status or message from its agent for {silent:.3g}s "
                f"(stall_seconds = {w.stall_seconds:g}, stall_kill_seconds = {w.stall_kill_seconds:g})",
            )


