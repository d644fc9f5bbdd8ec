"""A round: the tasks of one coordination, from queued to accounted.

``Coordinator.run_round`` (a ``run`` call's rounds) and the feed (submitted tasks, one
open-ended round) both go through the same steps here: :func:`begin_round` numbers the
round and makes it the context's current one, :func:`join_agents` takes the agents the
assign hook may choose from, :func:`distribute` sends the tasks, and
:func:`finish_round` counts what arrived (:func:`account`) and ends it.  The mesh
workload's plan (:func:`plan_mesh`, :func:`mesh_peer_indices`) and the checks of
explicit peers live here too.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict, deque
from typing import TYPE_CHECKING, Callable, Iterable

from .context import TICK
from .errors import ConfigError, PluginError
from .messages import Message, Task, TaskResult, check_agent_id
from .metrics import PHASES
from .report import RoundResult, percentile
from .roles import by_role
from .intake import is_count

if TYPE_CHECKING:
    from .context import CoordinatorContext


def _some(ids: list[str], limit: int = 6) -> str:
    """``a, b, c`` or, for many, ``a, b, c, ..., y, z``: enough for a person to see what is known."""
    if len(ids) <= limit:
        return ", ".join(ids) or "none"
    return ", ".join(ids[: limit // 2]) + ", ..., " + ", ".join(ids[-(limit // 2) :])


class Round:
    """Bookkeeping of the round in progress: its tasks, where each went, results, attempts.

    ``number`` is the round's number in the session (what its messages carry);
    ``result.round`` its place in the ``run`` call that started it.  Made by
    :func:`begin_round`, which makes it the context's current round until
    :func:`finish_round`; a result is recorded through :meth:`settle` only.
    """

    def __init__(self, number: int, run_number: int, tasks: list[Task]):
        self.number = number
        self.tasks = {t.id: t for t in tasks}
        self.order = [t.id for t in tasks]
        self.assigned: dict[str, str] = {}  # task id -> the agent it was sent to
        self.results: dict[str, TaskResult] = {}
        self.attempts: dict[str, int] = defaultdict(int)
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.result = RoundResult(round=run_number, session_round=number, tasks=len(tasks))
        self.collect = 0.0
        self.distributing = False  # tasks may still wait for an agent of the round
        self.executing = False  # results are being collected: the inbox's time counts as collect
        self.peers_sent = 0
        self.peers_received = 0
        self.agent_ids: list[str] = []  # the round's ready agents
        # the failure policy's state (cfn_core.intake.ResultIntake.retry_failed): tasks waiting out a backoff,
        # what each earlier attempt ended with, re-queues for rate limits (not attempts)
        self.requeue: list[tuple[float, str]] = []  # heap of (due, task id)
        self.history: dict[str, list[str]] = defaultdict(list)
        self.rate_limited: Counter[str] = Counter()

    @property
    def done(self) -> bool:
        return len(self.results) >= len(self.tasks)

    def settle(self, task_id: str, result: TaskResult) -> None:
        """Record a task's final result (once: a later one for the same task is not taken)."""
        self.results[task_id] = result
        if self.on_settle is not None:
            self.on_settle(task_id, result)

    #: called with ``(task id, TaskResult)`` for every result recorded (the feed resolves futures)
    on_settle: Callable[[str, TaskResult], None] | None = None


def check_task(task: Task) -> None:
    """The shape of a task given to ``run``: a string id, peers that are agent ids, a count."""
    if not isinstance(task.id, str) or not task.id:
        raise ConfigError(f"task id {task.id!r} is not allowed: a task id is a non-empty string")
    if isinstance(task.peers, str) or not isinstance(task.peers, (tuple, list)):
        raise ConfigError(f"task {task.id!r}: peers = {task.peers!r} must be a list of agent ids")
    for peer in task.peers:
        try:
            check_agent_id(peer)
        except ConfigError as exc:
            raise ConfigError(f"task {task.id!r}: peer {exc}") from None
    if not is_count(task.expect):
        raise ConfigError(f"task {task.id!r}: expect = {task.expect!r} must be an integer >= 0 (peer messages to wait for)")


def begin_round(ctx: CoordinatorContext, run_number: int | None, tasks: list[Task]) -> Round:
    """Number a new round (session-wide: what a pooled agent kept of earlier runs stays apart),
    make it the context's current round, log its tasks as queued and call ``cfn_coordination_start``.

    :param run_number: its place in its ``run`` call; None: the session's number (the feed).
    """
    ctx.rounds_started += 1  # never restarts
    r = Round(ctx.rounds_started, run_number or ctx.rounds_started, tasks)
    ctx._round = r
    ctx.round_state = {}
    ctx.spawn_failures = {}
    ctx.events.emit("round_started", round=r.number, tasks=len(tasks), agents=ctx.config.workload.agents)
    for task in tasks:
        ctx.events.emit("task_queued", task=task.id, round=r.number)
    ctx.hook.cfn_coordination_start(ctx=ctx, round=r.number)
    return r


def join_agents(ctx: CoordinatorContext, r: Round, agent_ids: Iterable[str]) -> list[str]:
    """The round's agents: those of ``agent_ids`` (acquired, past the ready barrier) that are ready.

    They are published in the run's directory before any task is sent (a handler's
    ``agent.peers()`` sees the whole round) and are where re-queued tasks go.
    """
    ready = [a for a in agent_ids if ctx.agents[a].state == "ready"]
    ctx.write_directory()
    r.agent_ids = ready
    r.result.agents = len(ready)
    r.result.spawn_failures = dict(ctx.spawn_failures)
    return ready


def finish_round(ctx: CoordinatorContext, r: Round, t_round: float) -> None:
    """Count the round's delivery (:func:`account`), log ``round_finished``, end it as the current round."""
    try:
        account(ctx, r, t_round)
        res = r.result
        ctx.events.emit(
            "round_finished", round=r.number, seconds=round(res.seconds, 6),
            done=sum(1 for x in r.results.values() if x.ok),
            failed=sum(1 for x in r.results.values() if not x.ok and not x.cancelled and not x.skipped),
            retries=res.retries, interrupted=res.interrupted, error=res.error,
        )
    finally:
        ctx._round = None


def distribute(ctx: CoordinatorContext, r: Round, agent_ids: list[str]) -> None:
    """Send every task of the round to an agent of its role, as ``cfn_assign`` chooses (mesh: one each)."""
    w = ctx.config.workload
    if not agent_ids:
        for task_id in r.order:
            r.settle(task_id, TaskResult(
                task=task_id, ok=False, error="no agent could be started", attempts=0, answered=False
            ))
            ctx.metrics.task_failures.inc()
            ctx.events.emit("task_failed", task=task_id, round=r.number, agent=None, attempt=0, seconds=None, latency=None, error="no agent could be started")
        return
    # a task goes to an agent of its role: the assign hook chooses among those alone
    groups = by_role(ctx.config, agent_ids)
    tasks = []
    for task_id in r.order:
        task = r.tasks[task_id]
        if groups.get(task.role):
            tasks.append(task)
        else:  # its role has no ready agent (the others may): it cannot run in this round
            r.settle(task_id, TaskResult(
                task=task_id, ok=False, error=f"no agent of role {task.role!r} could be started", attempts=0, answered=False
            ))
            ctx.metrics.task_failures.inc()
    preassigned: dict[str, str] = {}
    if w.topology == "mesh":
        tasks, preassigned = plan_mesh(ctx, r, tasks, groups)
    else:
        check_peers(ctx, r, tasks, agent_ids)
    batch: list[Message] = []
    pending = deque(tasks)
    while pending:
        task = pending[0]
        if task.id in r.results:  # reported not started (ctx.not_started) by the assign hook
            pending.popleft()
            continue
        agent_id = preassigned.get(task.id) or ctx.hook.cfn_assign(ctx=ctx, task=task, agent_ids=groups[task.role])
        if not agent_id:
            ctx.send(batch)
            batch = []
            ctx.pump(TICK)  # wait for an agent to become free
            continue
        handle = ctx.agents.get(agent_id)
        if handle is None:  # a plugin bug; a KeyError traceback would not say whose
            raise PluginError(f"cfn_assign returned {agent_id!r} for task {task.id}, which is not an agent of this run")
        pending.popleft()
        now = time.monotonic()
        handle.outstanding[task.id] = now
        handle.info["messages_in"] = handle.info.get("messages_in", 0) + 1
        r.assigned[task.id] = agent_id
        r.sent_at[task.id] = now
        ctx.events.emit("task_assigned", task=task.id, round=r.number, agent=agent_id, attempt=r.attempts[task.id] + 1)
        batch.append(ctx.factory.make(agent_id, "task", round=r.number, task=task.id, body=task.body()))
    ctx.send(batch)
    ctx.hook.cfn_flush(ctx=ctx, reason="explicit")

def plan_mesh(ctx: CoordinatorContext, r: Round, tasks: list[Task], groups: dict[str, list[str]]) -> tuple[list[Task], dict[str, str]]:
    """Give every task its own agent (of its role), then choose each one's peers (deterministic from ``seed``)."""
    w = ctx.config.workload
    number = r.result.round  # the same traffic in every run of a session: same seed, same plan
    assigned = []
    try:
        for task in tasks:
            agent_ids = groups[task.role]
            agent_id = ctx.hook.cfn_assign(ctx=ctx, task=task, agent_ids=agent_ids)
            if not agent_id or agent_id in assigned:
                n = sum(1 for t in tasks if t.role == task.role)
                raise ConfigError(
                    f"mesh round {number}: {n} tasks need {n} distinct agents; only {len(agent_ids)} are ready"
                    + (f" (role {task.role!r})" if ctx.config.roles else "")
                )
            assigned.append(agent_id)
            ctx.agents[agent_id].outstanding[task.id] = time.monotonic()  # so assign sees it busy
    finally:  # distribute marks them outstanding when it sends them; a refusal sends nothing
        for task, agent_id in zip(tasks, assigned):
            ctx.agents[agent_id].outstanding.pop(task.id, None)
    n = len(assigned)
    peers: list[list[str]] = [[] for _ in range(n)]
    expect = [0] * n
    for i, row in enumerate(mesh_peer_indices(n, w.messages_per_agent, w.seed, number)):
        for j in row:
            peers[i].append(assigned[j])
            expect[j] += 1
    depth = ctx.config.bus.inbox_depth
    if depth and max(expect) + 1 > depth:
        # an agent settles its peer messages only with its task: they would fill its inbox for good
        raise ConfigError(mesh_depth_message(number, max(expect), w.messages_per_agent, depth))
    planned, preassigned = [], {}
    for i, task in enumerate(tasks):
        t = Task(id=task.id, payload=task.payload, peers=tuple(peers[i]), expect=expect[i], role=task.role)
        r.tasks[t.id] = t
        preassigned[t.id] = assigned[i]
        planned.append(t)
    return planned, preassigned

def check_peers(ctx: CoordinatorContext, r: Round, tasks: list[Task], agent_ids: list[str]) -> None:
    """Refuse, before anything is sent, explicit peers (``Task(peers=..., expect=...)``)
    whose messages could not arrive or whose tasks could never complete."""
    addressed: Counter[str] = Counter()
    ready = set(agent_ids)
    for task in tasks:
        for peer in task.peers:
            if peer not in ready:
                known = ctx.spawn_failures.get(peer)
                raise ConfigError(
                    f"task {task.id!r}: peer {peer!r} is not an agent of this round"
                    + (f" (it could not be started: {known})" if known else "")
                    + f"; its {len(agent_ids)} agent(s): {_some(agent_ids)}"
                )
            addressed[peer] += 1
    depth = ctx.config.bus.inbox_depth
    most = max(addressed.values(), default=0)
    for task in tasks:
        if depth and task.expect + 1 > depth:
            # its peer messages are settled only with the task: they would fill the inbox for good
            raise ConfigError(
                f"task {task.id!r}: expect = {task.expect} peer messages, but [bus] inbox_depth = {depth} "
                f"lets an agent hold {depth - 1} besides its task; raise inbox_depth above {task.expect} "
                "(or 0: unlimited) or expect fewer"
            )
        if task.expect > most:
            raise ConfigError(
                f"task {task.id!r}: expect = {task.expect} peer messages, but no agent is sent more than "
                f"{most} in this round (the tasks' peers): it could never complete"
            )
    if depth and most + 1 > depth:
        busiest = addressed.most_common(1)[0][0]
        raise ConfigError(
            f"agent {busiest!r} is sent {most} peer messages in this round, but [bus] inbox_depth = {depth}; "
            f"raise inbox_depth above {most} (or 0: unlimited) or send fewer peer messages"
        )
    sent, expected = sum(addressed.values()), sum(task.expect for task in tasks)
    if sent != expected:
        # a message nobody waits for is counted nowhere; one waited for that is never sent hangs
        raise ConfigError(
            f"the tasks send {sent} peer message(s) but expect {expected} in all: every peer message "
            "must be expected by the task of the agent it is sent to"
        )

def account(ctx: CoordinatorContext, r: Round, t_round: float) -> None:
    """Delivery figures of the round, counted from what arrived."""
    res = r.result
    res.results = r.results
    res.seconds = time.perf_counter() - t_round
    expect_total = sum(t.expect for t in r.tasks.values())
    # a cancelled or skipped task was not meant to answer any more (submit, [[tasks]])
    withdrawn = sum(1 for x in r.results.values() if x.cancelled or x.skipped)
    res.planned = 2 * (len(r.tasks) - withdrawn) + expect_total
    from_agents = [x for x in r.results.values() if x.answered and not x.cancelled]
    res.delivered = 2 * len(from_agents) + sum(x.peers_received for x in from_agents)
    res.messages_sent = len(r.tasks) + len(from_agents) + r.peers_sent
    # the bus counts the whole run; the round gets what is new since the last round
    dead_total = ctx.bus.dead_letter_count()
    res.dead_lettered = max(0, dead_total - ctx.counters.get("dead_seen", 0))
    res.latency_p50 = percentile(r.latencies, 50)
    res.latency_p99 = percentile(r.latencies, 99)
    m = ctx.metrics
    m.coordination_seconds.observe(res.seconds)
    for phase in PHASES:
        m.phase_seconds.labels(phase=phase).observe(res.phases.get(phase, 0.0))
    m.delivery_rate.set(res.delivery_rate)
    if res.dead_lettered:
        m.messages_dead_lettered.inc(res.dead_lettered)
    ctx.counters["dead_seen"] = max(dead_total, ctx.counters.get("dead_seen", 0))
    for latency in r.latencies:
        m.latency_seconds.observe(latency)


def mesh_peer_indices(n: int, messages: int, seed: int, number: int) -> list[list[int]]:
    """The mesh plan of round ``number``: for each of ``n`` tasks, the indices of its peers.

    Deterministic from ``seed``; no task is its own peer.  Used to plan a round and,
    before anything starts, to check the configured workload's inboxes can hold it.
    """
    rng = random.Random(seed * 1_000_003 + number)
    rows: list[list[int]] = [[] for _ in range(n)]
    if n > 1:
        for i in range(n):
            for _ in range(messages):
                j = rng.randrange(n - 1)
                rows[i].append(j + (j >= i))
    return rows


def mesh_depth_message(number: int, fan_in: int, messages: int, depth: int) -> str:
    return (
        f"mesh round {number}: an agent must hold {fan_in} peer messages at once "
        f"([workload] messages_per_agent = {messages}) but [bus] inbox_depth = {depth}; "
        f"raise inbox_depth above {fan_in} (or 0: unlimited) or send fewer peer messages"
    )
