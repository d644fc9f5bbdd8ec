"""What arrives in the coordinator's inbox, and what becomes of it.

:class:`ResultIntake` reads the coordinator's inbox (``cfn_read``) and handles each
record by kind: ``ready`` (an agent answered), ``result`` (checked by
:func:`result_problem`, accepted only from the task's agent in the task's round,
de-duplicated, then settled in the round or, when the failure policy says so,
re-queued with backoff), ``status``, ``pong`` and ``retiring``.  Anything else is
counted as unexpected; nothing a record holds can crash the coordinator.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from .messages import COORDINATOR_ID, Message, Task, TaskResult, split_message_id
from .roles import by_role, role_of
from .usage import check_usage

if TYPE_CHECKING:
    from .context import AgentHandle, CoordinatorContext
    from .round import Round

log = logging.getLogger("cfn")


def is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def result_problem(msg: Message) -> str | None:
    """Why a result record cannot be accepted, or None when its shape is what agents send.

    Agents send ``{"ok": bool, "value": any, "error": str | None, "seconds": number >= 0,
    "peers_received": int >= 0, "peers_sent": int >= 0, "counters": {...},
    "stderr": str, "fallbacks": [...]}`` (all but ``ok`` optional) under an id
    ``<src>.<pid>.<seq>``.  Checked before any of it is used, so a forged or broken
    record is dead-lettered instead of crashing the coordinator.
    """
    parts = split_message_id(msg.id)
    if parts is None or parts[0] != msg.src:
        return f"result id {msg.id[:100]!r} is not '{msg.src[:100]}.<pid>.<seq>'"
    if msg.task is None:
        return "result names no task"
    body = msg.body
    if not isinstance(body, dict):
        return f"result body is {type(body).__name__}, not an object"
    if type(body.get("ok")) is not bool:
        return "result field 'ok' is missing or not true/false"
    for key in ("error", "stderr"):
        if body.get(key) is not None and type(body[key]) is not str:
            return f"result field {key!r} is not a string"
    seconds = body.get("seconds", 0.0)
    if type(seconds) not in (int, float) or not 0 <= seconds < float("inf"):
        return f"result field 'seconds' = {str(seconds)[:40]} is not a number >= 0"
    for key in ("peers_received", "peers_sent"):
        if not is_count(body.get(key, 0)):
            return f"result field {key!r} = {str(body[key])[:40]} is not an integer >= 0"
    if not isinstance(body.get("counters", {}), dict):
        return "result field 'counters' is not an object"
    if not isinstance(body.get("fallbacks", []), list):
        return "result field 'fallbacks' is not a list"
    if body.get("failure") is not None and body["failure"] not in FAILURES:
        return f"result field 'failure' = {str(body['failure'])[:40]!r} is not one of {', '.join(FAILURES)}"
    after = body.get("retry_after")
    if after is not None and (type(after) not in (int, float) or not 0 <= after < 86_400 * 7):
        return f"result field 'retry_after' = {str(after)[:40]} is not a number of seconds >= 0"
    if body.get("usage") is not None and check_usage(body["usage"]) is None:
        return "result field 'usage' is not an object of numbers >= 0"
    return None


#: failure classes a result may carry (cfn_core.agent.CommandFailed, RateLimited)
FAILURES = ("error", "retry", "fatal", "rate_limited", "timeout", "stalled", "oom")


class ResultIntake:
    """The coordinator's inbox reader and its failure policy (one per :class:`~cfn_core.context.CoordinatorContext`)."""

    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx
        #: ready messages that arrived before their launch returned (a launcher that forks ahead)
        self.early_ready: dict[str, Message] = {}

    def drain(self) -> None:
        ctx = self.ctx
        t0 = time.perf_counter()
        messages = ctx.hook.cfn_read(ctx=ctx, agent_id=COORDINATOR_ID)
        if not messages:
            return
        now = time.monotonic()
        ctx.counters["received"] += len(messages)
        for msg in messages:
            handle = ctx.agents.get(msg.src)
            if handle is not None:
                handle.last_seen = now
                handle.info["messages_out"] = handle.info.get("messages_out", 0) + 1
            kind = msg.kind
            if kind == "result":
                self.on_result(msg, handle, now)
            elif kind == "ready":
                self.on_ready(msg, handle, now)
            elif kind == "pong" and handle is not None:
                handle.info["pong_at"] = now
            elif kind == "status" and handle is not None:
                self.on_status(msg, handle, now)
            elif kind == "retiring" and handle is not None:
                self.on_retiring(msg, handle)
            else:
                ctx.counters["unexpected"] += 1
        ctx.bus.ack(COORDINATOR_ID, [m.receipt for m in messages])
        r = ctx._round
        if r is not None and r.executing:
            r.collect += time.perf_counter() - t0

    def on_status(self, msg: Message, handle: AgentHandle, now: float) -> None:
        """An agent's ``agent.status(text, **fields)``: the last one is kept on its handle."""
        ctx = self.ctx
        body = msg.body if isinstance(msg.body, dict) else {}
        text, fields = body.get("text"), body.get("fields")
        if not isinstance(text, str) or not isinstance(fields, dict):
            ctx.counters["unexpected"] += 1
            return
        handle.info["status"] = {"text": text[:1000], "fields": fields}
        handle.info["status_at"] = now
        handle.info["statuses"] = handle.info.get("statuses", 0) + 1
        ctx.counters["status"] += 1
        ctx.note_status(handle)  # the event log's agent_status; cfn top reads it from the snapshot

    def on_ready(self, msg: Message, handle: AgentHandle | None, now: float) -> None:
        ctx = self.ctx
        if handle is None or handle.state == "exited":
            # a launcher that starts agents ahead of their launch (cfn-pool's zygote pipelining):
            # kept until launch() registers the handle, which checks the pid
            self.early_ready[msg.src] = msg
            return
        if handle.state != "starting":
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if handle.pid is not None and body.get("pid") not in (None, handle.pid):
            return  # from an earlier incarnation
        handle.state = "ready"
        handle.ready_at = now
        ctx.metrics.spawn_seconds.observe(now - handle.launched_at)
        ctx.counters["ready"] += 1
        ctx.events.emit("agent_ready", agent=handle.id, pid=handle.pid, seconds=round(now - handle.launched_at, 6))
        ctx.hook.cfn_agent_started(ctx=ctx, agent=handle)
        if ctx.on_spawn_progress is not None:
            ctx.on_spawn_progress()

    def on_result(self, msg: Message, handle: AgentHandle | None, now: float) -> None:
        ctx = self.ctx
        r = ctx._round
        problem = result_problem(msg)
        if problem is not None:
            self.reject_result(msg, problem)
            return
        body = msg.body
        if handle is not None:  # an agent of the run: its plugins' counters and fallbacks
            pid = split_message_id(msg.id)[1]
            if "counters" in body:
                ctx.figures.take_result(msg.src, f"{msg.src}.{pid}", msg.seq, body["counters"])
            if "fallbacks" in body:
                from .fallback import merge_agent_fallbacks

                merge_agent_fallbacks(ctx, (msg.src, pid), body["fallbacks"])
        if r is None or msg.round != r.number or msg.task not in r.tasks:
            ctx.counters["stale_results"] += 1
            if handle is not None and (r is None or msg.task not in r.tasks):
                handle.outstanding.pop(msg.task, None)  # a late answer from an interrupted round
            return
        assignee = r.assigned.get(msg.task)
        if msg.src != assignee:
            # a stray or buggy process: it must not replace (or pre-empt) the real result
            self.reject_result(
                msg,
                f"result for task {msg.task} from {msg.src!r}, but the task "
                + (f"was sent to {assignee!r}" if assignee else "has not been sent to any agent"),
            )
            return
        handle.outstanding.pop(msg.task, None)
        if msg.task in r.results:
            if not r.results[msg.task].cancelled:  # a cancelled task's late answer is expected
                r.result.duplicates += 1
            return
        task = r.tasks[msg.task]
        if not body["ok"] and self.retry_failed(r, task, msg.src, body, now):
            return
        error = body.get("error")
        if not body["ok"] and r.history.get(msg.task):  # the summary says what every attempt ended with
            error = f"{error} [earlier attempts: " + "; ".join(r.history[msg.task]) + "]"
        r.settle(msg.task, TaskResult(
            task=msg.task,
            ok=body["ok"],
            value=body.get("value"),
            error=error,
            agent=msg.src,
            attempts=r.attempts.get(msg.task, 0) + 1,
            peers_received=min(body.get("peers_received", 0), task.expect),
            seconds=float(body.get("seconds", 0.0)),
            stderr=body.get("stderr"),
        ))
        if not r.results[msg.task].ok:
            ctx.metrics.task_failures.inc()  # as the summary's "failed" counts it
        sent = r.sent_at.get(msg.task)
        if sent is not None:
            r.latencies.append(now - sent)
        ctx.events.emit(
            "task_done" if body["ok"] else "task_failed", task=msg.task, round=r.number, agent=msg.src,
            attempt=r.results[msg.task].attempts, seconds=round(r.results[msg.task].seconds, 6),
            latency=None if sent is None else round(now - sent, 6), error=error,
        )
        peers_sent = min(body.get("peers_sent", 0), len(task.peers))  # no more than it was asked to send
        r.peers_sent += peers_sent
        # live counters that end equal to the round's figures: the result and the peer messages
        # its agent sent; delivered: the task (its result proves it), the result, its peers received
        ctx.metrics.messages_sent.inc(1 + peers_sent)
        ctx.metrics.messages_delivered.inc(2 + r.results[msg.task].peers_received)
        ctx.hook.cfn_task_result(ctx=ctx, task=task, agent_id=msg.src, outcome="done" if body["ok"] else "failed", body=body)

    # ------------------------------------------------------------------ failure policy

    def on_retiring(self, msg: Message, handle: AgentHandle) -> None:
        """An agent leaves for a fresh process (``[workload] max_tasks`` / ``max_rss_mb``): expect its exit."""
        ctx = self.ctx
        body = msg.body if isinstance(msg.body, dict) else {}
        if handle.state != "ready" or body.get("pid") not in (None, handle.pid):
            return
        handle.state = "stopping"  # its exit is a stop, not a death: no attempt is charged
        handle.info["recycling"] = str(body.get("why"))[:200]
        ctx.counters["recycled"] += 1

    def retry_failed(self, r: Round, task: Task, agent_id: str, body: dict, now: float) -> bool:
        """A failed result: re-queue its task with backoff if the failure policy says so.

        ``rate_limited`` is re-queued without charging an attempt (up to ``[workload]
        max_rate_limited`` times), after ``retry_after`` or the backoff; ``retry`` and
        ``stalled`` are charged an attempt and re-queued until ``max_attempts``.
        Returns True when the task was re-queued (no result is recorded).
        """
        ctx = self.ctx
        failure = body.get("failure")
        w = ctx.config.workload
        error = body.get("error") or failure
        if failure == "rate_limited":
            r.rate_limited[task.id] += 1
            n = r.rate_limited[task.id]
            if n > w.max_rate_limited:
                r.history[task.id].append(f"rate limited {n - 1} times (max_rate_limited = {w.max_rate_limited})")
                return False
            after = body.get("retry_after")
            delay = float(after) if after is not None else self.backoff(n)
            reason = f"rate limited (not charged as an attempt; #{n}): {error}"
        elif failure in ("retry", "stalled"):
            attempts = r.attempts[task.id] + 1  # the attempt that just failed
            if attempts >= role_of(ctx.config, agent_id).max_attempts:
                return False  # its result is the last attempt's: recorded with the earlier ones' reasons
            r.attempts[task.id] = attempts
            r.history[task.id].append(f"{attempts}: {error}")
            delay = self.backoff(attempts)
            reason = f"attempt {attempts} failed ({failure}): {error}"
            r.result.retries += 1
            ctx.metrics.task_retries.inc()
        else:
            return False
        heapq.heappush(r.requeue, (now + delay, task.id))
        ctx.events.emit("task_retried", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1, reason=f"{reason}; again in {delay:.3g}s")
        ctx.hook.cfn_task_result(ctx=ctx, task=task, agent_id=agent_id, outcome="requeued", body=body)
        return True

    def backoff(self, n: int) -> float:
        """Seconds before the ``n``-th retry: exponential from ``retry_backoff``, capped, full jitter over its upper half."""
        ctx = self.ctx
        w = ctx.config.workload
        ceiling = min(w.retry_backoff_max, w.retry_backoff * 2 ** min(n - 1, 30))
        return ceiling * (0.5 + 0.5 * random.random())

    def requeue_due(self, now: float) -> None:
        """Send the re-queued tasks whose backoff is over (the assign hook may still say "not now")."""
        ctx = self.ctx
        r = ctx._round
        if r is None or not r.requeue or r.requeue[0][0] > now:
            return
        groups = by_role(ctx.config, [a for a in r.agent_ids if a in ctx.agents and ctx.agents[a].alive])
        batch = []
        while r.requeue and r.requeue[0][0] <= now:
            task = r.tasks[r.requeue[0][1]]
            if task.id in r.results:  # reported not started meanwhile (a budget)
                heapq.heappop(r.requeue)
                continue
            if not groups.get(task.role):  # every agent of its role is gone for good: it cannot run again
                heapq.heappop(r.requeue)
                r.settle(task.id, TaskResult(
                    task=task.id, ok=False, error=f"re-queued, but no agent of role {task.role!r} is left: " + "; ".join(r.history[task.id]),
                    attempts=r.attempts[task.id], answered=False,
                ))
                ctx.metrics.task_failures.inc()
                ctx.events.emit("task_failed", task=task.id, round=r.number, agent=None, attempt=r.attempts[task.id], seconds=None, latency=None, error=r.results[task.id].error)
                continue
            agent_id = ctx.hook.cfn_assign(ctx=ctx, task=task, agent_ids=groups[task.role])
            if not agent_id:
                break  # not now (a limit, every agent busy): the next tick asks again
            heapq.heappop(r.requeue)
            handle = ctx.agents[agent_id]
            handle.outstanding[task.id] = now
            r.assigned[task.id] = agent_id
            r.sent_at[task.id] = now
            ctx.events.emit("task_assigned", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1)
            batch.append(ctx.factory.make(agent_id, "task", round=r.number, task=task.id, body=task.body()))
        ctx.send(batch)

    def reject_result(self, msg: Message, reason: str) -> None:
        """Dead-letter a result record that cannot be accepted (counted in ``dead_lettered``)."""
        ctx = self.ctx
        ctx.counters["rejected_results"] += 1
        log.warning("result %s dead-lettered: %s", msg.id[:100], reason)
        ctx.bus.dead_letter(COORDINATOR_ID, msg.encode(), reason)

