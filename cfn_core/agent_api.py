"""Agents that talk: the ``agent`` object user code gets, and the agent-side message state.

A handler ``def handle(payload, agent)`` (or a class agent's ``on_task`` / ``on_message``)
gets an :class:`Agent`: its identity, the run's directory of agents, and messages to
and from other agents (docs/USER_GUIDE.md "Agents that talk"; the guarantees are in
docs/RELIABILITY.md).

Wire format: kind ``user`` records whose body is ``{"k": user kind, "b": user body,
"re": id of the message answered or null, "rq": true when a reply is awaited, "t": topic
or null}``; ``status`` records to the coordinator with ``{"text": str, "fields": {...}}``.

The agent process stays the single reader of its inbox: ``receive`` reads through the
agent loop (:class:`cfn_core.agent.AgentLoop`), so a task or a stop that arrives while a
handler waits is queued for the loop, and user messages the handler does not ask for
(another sender, another kind) wait in the mailbox.  Settling follows the loop's rule:
a user message consumed during a task is settled with that task, after its result is
flushed; one handled by ``on_message`` after ``on_message`` returns.  Until then a
replacement of an agent that died re-reads it.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

import orjson
from attrs import define, field

from .errors import CfnError, ConfigError, NotJSON, PeerGone, ReceiveTimeout, RequestTimeout, UnknownAgent
from .messages import COORDINATOR_ID, Message, check_agent_id, user_message_id

if TYPE_CHECKING:
    from .agent import AgentLoop

log = logging.getLogger("cfn.agent")

#: user message ids remembered for de-duplication (a retried task re-sends the same ids)
_RECENT_MESSAGES = 8192
#: how often a request checks that its peer is still in the run's directory
_PEER_CHECK_SECONDS = 0.5
#: the role of every agent of a run that declares none (``[workload]``)
DEFAULT_ROLE = "worker"


class RateLimited(Exception):
    """Raise from a handler when the remote side said "too many requests" (HTTP 429).

    The task is re-queued with exponential backoff and jitter, not charged as an
    attempt, and a rate limit (cfn-limits) lowers the run's start rate for a while.

    :param retry_after: seconds the remote side asked to wait (its ``Retry-After``);
        None: the backoff's own.
    """

    def __init__(self, message: str = "rate limited", retry_after: float | None = None):
        super().__init__(message)
        if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or not retry_after >= 0):
            raise ValueError(f"RateLimited retry_after = {retry_after!r}: must be a number of seconds >= 0 or None")
        self.retry_after = None if retry_after is None else float(retry_after)


@define(frozen=True)
class AgentMessage:
    """A user message as ``agent.receive`` returns it.

    :param sender: the agent id that sent it.
    :param kind: the sender's ``kind`` (``"msg"`` by default; ``"request"``/``"reply"`` for
        ``agent.request``/``agent.reply``).
    :param body: any JSON value.
    :param id: unique id; a retried task's re-send has the same one (de-duplicated).
    :param sent_at: the sender's wall clock when it sent it (``time.time()``).
    :param reply_to: the id of the message this one answers (``agent.reply``), else None.
    :param topic: the topic it was published on (``agent.publish``), else None.
    :param wants_reply: the sender waits in ``agent.request`` for an ``agent.reply``.
    """

    sender: str
    kind: str
    body: Any
    id: str
    sent_at: float
    reply_to: str | None = None
    topic: str | None = None
    wants_reply: bool = False
    receipt: Any = field(default=None, eq=False, repr=False)

    def to_dict(self) -> dict:
        """The JSON form ``cfn msg recv --json`` prints."""
        return {
            "id": self.id, "sender": self.sender, "kind": self.kind, "body": self.body,
            "sent_at": self.sent_at, "reply_to": self.reply_to, "topic": self.topic,
            "wants_reply": self.wants_reply,
        }


def json_problem(value: Any) -> str | None:
    """Why ``value`` is not JSON (naming the offending type), or None when it is."""
    try:
        orjson.dumps(value)
        return None
    except TypeError:
        pass
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    return f"a dict key of type {type(k).__name__} (JSON object keys are strings)"
                stack.append(item)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif v is None or isinstance(v, (str, int, float, bool)):
            try:
                orjson.dumps(v)
            except TypeError:  # an int beyond 64 bits
                return f"the integer {str(v)[:30]} (JSON numbers here fit in 64 bits)"
        else:
            return f"a value of type {type(v).__name__}"
    return "a value that is not JSON"


def check_json(value: Any, what: str) -> None:
    """Raise :class:`NotJSON` naming the type when ``value`` cannot travel as JSON."""
    problem = json_problem(value)
    if problem is not None:
        raise NotJSON(f"{what} is not JSON: it contains {problem}; send dicts, lists, str, int, float, bool or None")


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise ConfigError(f"message kind {kind!r:.80} is not allowed: use a non-empty string of at most 64 characters")
    return kind


def _some(names: list[str], limit: int = 8) -> str:
    if len(names) <= limit:
        return ", ".join(names) or "none"
    return ", ".join(names[: limit // 2]) + f", ... ({len(names)} in all), " + ", ".join(names[-(limit // 2) :])


# ---------------------------------------------------------------------- user code


class UserCode:
    """A handler as the loop calls it: a function of ``payload`` (and maybe ``agent``), or a class agent."""

    def __init__(self, handler: Any):
        self.instance = None
        self.started = False
        self.start_error: str | None = None
        if inspect.isclass(handler) and callable(getattr(handler, "on_task", None)):
            self.instance = target = handler()  # one instance per agent process: its state lasts
            self._task = target.on_task
            self.wants_agent = True
        else:
            target = handler
            self._task = handler
            self.wants_agent = _takes_agent_cached(handler)
        self.on_start = getattr(target, "on_start", None) if self.instance is not None else None
        self.on_stop = getattr(target, "on_stop", None) if self.instance is not None else None
        self.on_message = getattr(target, "on_message", None) if self.instance is not None else None
        self.scatter = getattr(target, "scatter", None)
        self.gather = getattr(target, "gather", None)

    def task(self, payload: Any, agent: "Agent") -> Any:
        self.ensure_started(agent)
        if self.start_error is not None:
            raise RuntimeError(self.start_error)
        return self._task(payload, agent) if self.wants_agent else self._task(payload)

    def ensure_started(self, agent: "Agent") -> None:
        """Call ``on_start`` once, before the first task or message (the run's directory exists by then)."""
        if self.started:
            return
        self.started = True
        if self.on_start is not None:
            from .agent import describe_exception

            try:
                self.on_start(agent)
            except Exception as exc:  # every task of this agent fails with the reason
                self.start_error = f"on_start failed: {describe_exception(exc)}"
                log.warning("%s", self.start_error)

    def start(self, loop: "AgentLoop") -> None:
        """The agent is ready: nothing to do yet (``on_start`` waits for the first work)."""

    def stop(self, loop: "AgentLoop") -> None:
        if self.on_stop is not None and self.started:
            from .agent import describe_exception

            try:
                self.on_stop(loop.agent)
            except Exception as exc:
                log.warning("on_stop failed: %s", describe_exception(exc))


_TAKES_AGENT: dict[Any, bool] = {}


def _takes_agent_cached(handler: Callable) -> bool:
    """:func:`takes_agent`, computed once per handler (a host builds thousands of agents from one)."""
    try:
        return _TAKES_AGENT[handler]
    except TypeError:  # unhashable
        return takes_agent(handler)
    except KeyError:
        found = _TAKES_AGENT[handler] = takes_agent(handler)
        return found


def takes_agent(handler: Callable) -> bool:
    """Does ``handler`` take the agent as its second argument?

    Yes when its second positional parameter is named ``agent`` or has no default
    (``def handle(payload, agent)``); a function of one argument gets the payload only.
    """
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the classic one argument
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        return False
    second = positional[1]
    return second.name == "agent" or second.default is inspect.Parameter.empty


# ---------------------------------------------------------------------- the state behind Agent


class Talk:
    """The agent process's user messages: directory, mailbox, de-duplication, ids, settling."""

    def __init__(self, loop: "AgentLoop"):
        from .agent import _RecentIds

        self.loop = loop
        self.ctx = loop.ctx
        self.bus = loop.bus
        self.agent_id = loop.agent_id
        self.mailbox: deque[AgentMessage] = deque()
        self.recent = _RecentIds(_RECENT_MESSAGES)
        self.subscriptions: set[str] = set()
        self.consumed_in_task: list = []  # receipts settled with the running task
        self.sends_in_task = 0
        self.usage_in_task: dict | None = None  # agent.usage() of the running task
        self.directory: dict[str, str] | None = None  # agent id -> role
        self.round_robin: dict[tuple, int] = {}  # sends to a role so far (per task inside one)
        self.agent = Agent(self)

    # -------------------------------------------------------------- the loop's side

    def accept(self, msg: Message) -> None:
        """A ``user`` record was read: de-duplicate it, filter topics, queue it in the mailbox."""
        body = msg.body
        problem = _user_body_problem(body)
        if problem is not None:
            self.loop.reject(msg, f"user message from {msg.src[:80]}: {problem}")
            self.loop.settled.append(msg.receipt)
            return
        if not self.recent.add(msg.id):
            self.ctx.counters["duplicate_messages"] += 1  # a retried task's re-send, or a redelivered copy
            self.loop.settled.append(msg.receipt)
            return
        topic = body.get("t")
        if topic is not None and topic not in self.subscriptions:
            self.ctx.counters["unsubscribed_dropped"] += 1
            self.loop.settled.append(msg.receipt)
            return
        self.ctx.counters["messages_received"] += 1
        self.mailbox.append(
            AgentMessage(
                sender=msg.src, kind=body.get("k", "msg"), body=body.get("b"), id=msg.id, sent_at=msg.ts,
                reply_to=body.get("re"), topic=topic, wants_reply=bool(body.get("rq")), receipt=msg.receipt,
            )
        )

    def new_round(self) -> None:
        self.directory = None  # a newer round may have other agents: re-read when asked

    def task_started(self, msg: Message) -> None:
        self.sends_in_task = 0
        self.consumed_in_task = []
        self.usage_in_task: dict | None = None  # agent.usage() of this task

    def task_finished(self) -> list:
        held, self.consumed_in_task = self.consumed_in_task, []
        return held

    def next_for_handler(self) -> AgentMessage | None:
        return self.mailbox.popleft() if self.mailbox else None

    def handle_message(self, message: AgentMessage) -> None:
        """``on_message`` while idle; an exception in it is reported (dead letter, warning), nothing else fails."""
        from .agent import describe_exception

        loop = self.loop
        user = loop.user
        user.ensure_started(self.agent)
        try:
            user.on_message(message, self.agent)
        except Exception as exc:
            why = f"on_message failed for message {message.id} from {message.sender}: {describe_exception(exc)}"
            log.warning("%s", why)
            self.ctx.counters["on_message_errors"] += 1
            self._dead_letter(message, why)
        loop.settled.append(message.receipt)

    def _dead_letter(self, message: AgentMessage, reason: str) -> None:
        record = json.dumps({"message": message.to_dict(), "dst": self.agent_id}).encode() + b"\n"
        try:
            self.bus.dead_letter(self.agent_id, record, reason)
        except (CfnError, OSError) as exc:
            log.warning("could not dead-letter message %s: %s", message.id, exc)

    # -------------------------------------------------------------- directory

    def read_directory(self) -> dict[str, str]:
        raw = self.bus.get_state("directory")
        agents: dict[str, str] = {}
        try:
            doc = json.loads(raw) if raw else {}
            for agent_id, entry in (doc.get("agents") or {}).items():
                role = entry.get("role") if isinstance(entry, dict) else None
                agents[agent_id] = role if isinstance(role, str) else DEFAULT_ROLE
        except (ValueError, AttributeError):
            log.warning("the run's directory is not readable: %.80r", raw)
        self.directory = agents
        return agents

    def known(self, refresh: bool = False) -> dict[str, str]:
        if self.directory is None or refresh:
            return self.read_directory()
        return self.directory

    def role_of(self, agent_id: str) -> str:
        role = self.known().get(agent_id)
        if role is None:
            role = self.known(refresh=True).get(agent_id)
        return role or DEFAULT_ROLE

    def resolve(self, to: Any) -> str:
        """The agent id that ``to`` (an agent id or a role) names; raises UnknownAgent naming the known ones."""
        if not isinstance(to, str):
            raise UnknownAgent(f"a message is addressed to {to!r:.80}, not an agent id or role name (a string)")
        for refresh in (False, True):
            agents = self.known(refresh)
            if to in agents:
                return to
            members = sorted(a for a, r in agents.items() if r == to)
            if members:
                others = [a for a in members if a != self.agent_id] or members
                return others[self._role_pick(to) % len(others)]
        roles = sorted(set(agents.values()))
        raise UnknownAgent(
            f"no agent or role {to!r:.80} in this run; agents: {_some(sorted(agents))}; roles: {', '.join(roles) or 'none'}"
        )

    def _role_pick(self, role: str) -> int:
        """Which of a role's agents the next send to ``role`` goes to (an index, before the modulo).

        Round robin per sender, from a start that depends on the sender (so forty coders'
        first requests to ``reviewer`` do not all go to the first reviewer).  Inside a task
        the count restarts with the task and the start depends on the task too: a retried
        attempt (a replacement of an agent that died) then picks the same agents in the same
        order, so its re-sends reach the receivers that can drop them as copies.
        """
        current = self.loop.current
        key = (role, current.round, current.task) if current is not None else (role,)
        i = self.round_robin.get(key, 0)
        self.round_robin[key] = i + 1
        if current is not None and len(self.round_robin) > 4096:  # one entry per (role, task): bounded
            self.round_robin = {key: i + 1}
        start = zlib.crc32("\0".join((self.agent_id, *map(str, key[1:]))).encode())
        return start + i

    # -------------------------------------------------------------- sending

    def next_id(self) -> str | None:
        """A deterministic id inside a task (a retry re-sends the same ids), else None (the factory's)."""
        current = self.loop.current
        if current is None:
            return None
        self.sends_in_task += 1
        return user_message_id(self.agent_id, current.round, current.task, self.sends_in_task)

    def send_many(self, targets: list[str], body: Any, kind: str, *, re: str | None = None,
                  rq: bool = False, topic: str | None = None) -> list[str]:
        """Send one user message to each of ``targets`` (agent ids), flushed before returning their ids.

        Raises :class:`NotJSON`, :class:`~cfn_core.errors.MessageTooLarge` (naming the limit)
        before anything is sent, and :class:`~cfn_core.errors.InboxFull` when a receiver's
        inbox stayed full for the bus's wait.
        """
        _check_kind(kind)
        check_json(body, "the message body")
        self.loop.check_cancelled()
        current = self.loop.current
        limit = self.loop.config.bus.max_message_bytes
        envelope = {"k": kind, "b": body, "re": re, "rq": rq, "t": topic}
        messages = []
        for dst in targets:
            msg = self.ctx.factory.make(
                dst, "user", round=current.round if current else 0, task=current.task if current else None,
                body=envelope, id=self.next_id(),
            )
            msg.encode(limit)  # too large: raised here, before any copy is sent
            self.ctx.route(dst)
            messages.append(msg)
        if messages:
            self.ctx.send(messages, flush=True)
            # now, not at the end of the task: the receiver may be waiting for it (a request),
            # and a full inbox (InboxFull) must surface at this call
            self.loop._flush(ctx=self.ctx, reason="explicit")
            self.ctx.counters["messages_sent"] += len(messages)
        return [m.id for m in messages]

    def status(self, text: str, fields: dict) -> None:
        if not isinstance(text, str):
            raise NotJSON(f"agent.status text must be a string, not {type(text).__name__}")
        check_json(fields, "agent.status fields")
        self.loop.check_cancelled()
        self.ctx.send([self.ctx.factory.make(COORDINATOR_ID, "status", body={"text": text, "fields": fields})])
        self.loop._flush(ctx=self.ctx, reason="explicit")

    # -------------------------------------------------------------- receiving

    def take(self, kind: str | None, sender: str | None, reply_to: str | None) -> AgentMessage | None:
        """The first queued message that matches (FIFO per sender is the mailbox's order), consumed."""
        for i, m in enumerate(self.mailbox):
            if (kind is None or m.kind == kind) and (sender is None or m.sender == sender) and (
                reply_to is None or m.reply_to == reply_to
            ):
                del self.mailbox[i]
                if self.loop.current is not None:
                    self.consumed_in_task.append(m.receipt)  # settled with the task, after its result
                else:
                    self.loop.settled.append(m.receipt)
                return m
        return None

    def wait_for(self, timeout: float | None, kind=None, sender=None, reply_to=None,
                 check: Callable[[], None] | None = None) -> AgentMessage | None:
        """Read the inbox until a matching message is there (None after ``timeout`` seconds).

        ``check`` (raises to end the wait: a request's peer left) runs every
        ``_PEER_CHECK_SECONDS`` of waiting, the first time after that long.
        """
        steps = self.waiting(timeout, kind, sender, reply_to, check)
        while True:
            try:
                sleep = next(steps)
            except StopIteration as done:
                return done.value
            self.loop.sleep(sleep)

    def waiting(self, timeout: float | None, kind, sender, reply_to, check: Callable[[], None] | None):
        """The wait of :meth:`wait_for` (and of a hosted agent's awaitable one) as a generator.

        It yields how long to sleep (None: until woken) and returns the matching message,
        or None after ``timeout``; the caller sleeps however it sleeps (a system call, an
        ``await``) and resumes it.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        next_check = start + _PEER_CHECK_SECONDS
        loop = self.loop
        while True:
            found = self.take(kind, sender, reply_to)
            if found is not None:
                return found
            loop.settle()  # what this agent sent reaches its peers before it waits for them
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            remaining = None if deadline is None else deadline - now
            if check is not None:
                # not before every sleep: a reply usually comes within one, and the check
                # reads the run's directory (profiled: 13% of a request/reply round trip)
                if now >= next_check:
                    check()
                    next_check = now + _PEER_CHECK_SECONDS
                wake = next_check - now
                remaining = wake if remaining is None else min(remaining, wake)
            yield remaining
            loop.read_inbox()
            loop.check_cancelled()


def _user_body_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return f"body is {type(body).__name__}, not an object"
    if not isinstance(body.get("k", "msg"), str):
        return "field 'k' (kind) is not a string"
    for key in ("re", "t"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return f"field {key!r} is not a string"
    return None


# ---------------------------------------------------------------------- the agent object


class Agent:
    """What a handler gets as ``agent``: identity, the run's directory, messages.

    Guarantees (docs/RELIABILITY.md): per-sender FIFO to each receiver; nothing lost (a
    message stays in the receiver's inbox until it is consumed and its work settled);
    copies (a retried task's re-sends, a redelivery to a replacement) de-duplicated by id.
    """

    def __init__(self, talk: Talk):
        self._talk = talk
        self.id: str = talk.agent_id

    def __repr__(self) -> str:
        return f"<cfn agent {self.id} ({self.role})>"

    @property
    def role(self) -> str:
        """This agent's role in the run (``"worker"`` when the run declares none)."""
        return self._talk.role_of(self.id)

    def peers(self, role: str | None = None) -> list[str]:
        """The other agents of the run (of ``role`` if given), sorted; re-read when a newer round began."""
        agents = self._talk.known()
        if role is not None and role not in agents.values():
            agents = self._talk.known(refresh=True)
        return sorted(a for a, r in agents.items() if a != self.id and (role is None or r == role))

    def send(self, to: str, body: Any, kind: str = "msg") -> str:
        """Send ``body`` (any JSON value) to the agent ``to``, or to one agent of role ``to``
        (round robin per sender, spread over senders; a retried task picks the same agents).
        Returns the message id.

        :raises UnknownAgent: ``to`` is neither an agent nor a role of the run (names the known ones).
        :raises NotJSON: ``body`` is not JSON (names the type).
        :raises MessageTooLarge: the message exceeds ``[bus] max_message_bytes`` (names the limit).
        :raises InboxFull: the receiver's inbox stayed full (``[bus] inbox_depth``) for the bus's wait.
        """
        return self._talk.send_many([self._talk.resolve(to)], body, kind)[0]

    def broadcast(self, body: Any, kind: str = "msg", role: str | None = None) -> list[str]:
        """Send ``body`` to every other agent of the run (of ``role`` if given); returns the ids."""
        if role is not None:
            self._talk.resolve(role)  # an unknown role raises, naming the known ones
        return self._talk.send_many(self.peers(role), body, kind)

    def publish(self, topic: str, body: Any) -> list[str]:
        """Send ``body`` on ``topic`` to every other agent; those not subscribed to it drop it."""
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"topic {topic!r:.80} is not allowed: use a non-empty string")
        return self._talk.send_many(self.peers(), body, "msg", topic=topic)

    def subscribe(self, topic: str) -> None:
        """Receive what is published on ``topic`` from now on."""
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"topic {topic!r:.80} is not allowed: use a non-empty string")
        self._talk.subscriptions.add(topic)

    def receive(self, timeout: float | None = None, kind: str | None = None, sender: str | None = None) -> AgentMessage:
        """The next message (of ``kind``, from ``sender``, if given), waiting up to ``timeout`` seconds.

        Messages that do not match stay queued, in order, for a later ``receive``.

        :raises ReceiveTimeout: nothing matching arrived in time (a ``TimeoutError``).
        """
        message = self._talk.wait_for(timeout, kind=kind, sender=sender)
        if message is None:
            wanted = "".join([f" of kind {kind!r}" if kind else "", f" from {sender}" if sender else ""])
            raise ReceiveTimeout(f"agent {self.id}: no message{wanted} within {timeout:g}s")
        return message

    def messages(self, timeout: float | None = None, kind: str | None = None, sender: str | None = None) -> Iterator[AgentMessage]:
        """Iterate over incoming messages; ends when none arrives within ``timeout`` seconds."""
        while True:
            message = self._talk.wait_for(timeout, kind=kind, sender=sender)
            if message is None:
                return
            yield message

    def request(self, to: str, body: Any, timeout: float, kind: str = "request") -> Any:
        """Send ``body`` to ``to`` and return the body of its ``agent.reply``.

        :raises RequestTimeout: no reply within ``timeout`` seconds.
        :raises PeerGone: the peer left the run (died and was not replaced, or was stopped).
        """
        dst, msg_id, peer_still_there = self._ask(to, body, kind)
        answer = self._talk.wait_for(timeout, reply_to=msg_id, sender=dst, check=peer_still_there)
        return self._answer(answer, dst, msg_id, timeout)

    def _ask(self, to: str, body: Any, kind: str) -> tuple[str, str, Callable[[], None]]:
        """A request's send: its destination, its message id and the check that the peer is still there."""
        talk = self._talk
        dst = talk.resolve(to)
        msg_id = talk.send_many([dst], body, kind, rq=True)[0]

        def peer_still_there() -> None:
            if dst not in talk.known(refresh=True):
                raise PeerGone(f"agent {self.id}: {dst} left the run before it replied to request {msg_id}")

        return dst, msg_id, peer_still_there

    def _answer(self, answer: AgentMessage | None, dst: str, msg_id: str, timeout: float) -> Any:
        if answer is None:
            raise RequestTimeout(f"agent {self.id}: no reply from {dst} to request {msg_id} within {timeout:g}s")
        return answer.body

    def reply(self, message: AgentMessage, body: Any) -> str:
        """Answer ``message`` (its sender's ``agent.request`` returns ``body``).  Returns the reply's id."""
        if not isinstance(message, AgentMessage):
            raise TypeError(f"agent.reply answers a received message, not {type(message).__name__}")
        check_agent_id(message.sender)
        return self._talk.send_many([message.sender], body, "reply", re=message.id)[0]

    def status(self, text: str, **fields: Any) -> None:
        """Tell the coordinator what this agent is doing (``AgentHandle.info["status"]``, events, metrics)."""
        self._talk.status(text, fields)

    def usage(self, *, tokens_in: int = 0, tokens_out: int = 0, cost_usd: float = 0.0, turns: int = 0) -> None:
        """Report what the current task spent (an LLM call's tokens and cost); calls add up.

        The figures travel with the task's result (its ``usage`` field) to the
        coordinator, where an accounting plugin (cfn-llm) sums them per task, agent,
        role and run, and a budget (``[limits] budget_usd``) counts them.
        """
        from .usage import add_usage, check_usage

        figures = check_usage({"tokens_in": tokens_in, "tokens_out": tokens_out, "cost_usd": cost_usd, "turns": turns})
        if figures is None:
            raise ValueError(
                f"agent.usage: tokens_in={tokens_in!r}, tokens_out={tokens_out!r}, cost_usd={cost_usd!r}, turns={turns!r}: "
                "each must be a number >= 0"
            )
        talk = self._talk
        talk.usage_in_task = add_usage(talk.usage_in_task or {}, figures)
