"""Message, Task and TaskResult records and their wire format.

A message travels as one line of JSON (``orjson``; never pickle): nothing a
sender writes can make a receiver import or run code.  JSON escapes newlines
inside strings, so ``\\n`` only ever ends a record, which is what lets a reader
split an inbox into records without a length prefix.

Message ids are ``{sender}.{pid}.{seq}``: the sender's id, the process id of the
incarnation that sent it and a per-process counter, so ids never collide, not
even for thousands of messages sent in the same millisecond or by a replacement
of a dead agent.  The one exception is a mesh peer message, whose id
(:func:`peer_message_id`) must be the same when a replacement re-sends it, so
that its receiver counts it once; its ``seq`` still comes from the sender's
counter.  Likewise a user message sent while a task runs has the id
:func:`user_message_id` (``{sender}.{round}.{task}.m{n}``): a retried task re-sends
the same ids and receivers de-duplicate them.

``round`` is the round's number within the coordinator's session: 1, 2, ...
across every ``Coordinator.run`` of one session, never restarting, so the
messages of a pooled agent's earlier runs can never be taken for this one's.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Any

import orjson
from attrs import define, field

from .errors import ConfigError, MessageTooLarge

#: The coordinator's own inbox id.  It cannot clash with an agent id because
#: agent ids must start with a letter or digit.
COORDINATOR_ID = "_coordinator"

#: Message kinds.  ``task``/``result`` carry work, ``peer`` is an agent-to-agent
#: message of the mesh workload, ``ready`` is an agent's answer to being
#: started, ``stop`` asks an agent to exit, ``ping``/``pong`` are health checks,
#: ``user`` is a message user code sent to another agent (``agent.send``; its body is
#: ``{"k": user kind, "b": user body, "re": id answered or null, "rq": reply awaited,
#: "t": topic or null}``), ``status`` an agent's ``agent.status`` for the coordinator,
#: ``cancel`` asks an agent to stop the task it names (``Coordinator.cancel``),
#: ``retiring`` tells the coordinator an agent is being recycled ([workload] max_tasks /
#: max_rss_mb) and ``host`` carries the coordinator's orders to a host process and its
#: reports back (body ``{"op": ...}``, cfn_core.host).
KINDS = frozenset({"task", "result", "peer", "ready", "stop", "ping", "pong", "user", "status", "cancel", "retiring", "host"})

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if it is safe as a file name, else raise ConfigError.

    Allowed: 1-64 characters of letters, digits, ``_ . -``, starting with a
    letter or digit, and never ``..`` (no path traversal into other runs).
    """
    if (
        not isinstance(agent_id, str)
        or not AGENT_ID_RE.match(agent_id)
        or ".." in agent_id
    ):
        shown = repr(agent_id)
        if len(shown) > 80:  # an id from a hostile record may be any length
            shown = f"{shown[:60]}... ({len(agent_id)} characters)"
        raise ConfigError(
            f"agent id {shown} is not allowed: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit, without '..'"
        )
    return agent_id


#: the kernel's inboxes besides the coordinator's: its host manager's, and each host process's
#: (``_host.<role>.<k>``, docs/HOSTING.md); like the coordinator's they start with ``_``
HOSTS_INBOX = "_hosts"
HOST_PREFIX = "_host."


def check_inbox_id(inbox_id: str) -> str:
    """Return ``inbox_id`` if it is an agent id (:func:`check_agent_id`) or one of the kernel's own inboxes.

    For a transport that keeps inboxes by id (cfn-redis's relay): the coordinator's, the
    host manager's and a host's are inboxes too, and safe as file names.
    """
    if inbox_id in (COORDINATOR_ID, HOSTS_INBOX):
        return inbox_id
    if isinstance(inbox_id, str) and inbox_id.startswith(HOST_PREFIX):
        check_agent_id(inbox_id[len(HOST_PREFIX):])
        return inbox_id
    return check_agent_id(inbox_id)


class MalformedMessage(ValueError):
    """Bytes on the bus that are not a valid message.  They are dead-lettered."""


@define(slots=True)
class Message:
    """One message on the bus.

    :param id: unique id (see module docstring); receivers de-duplicate by it.
    :param src: sender id (an agent id or :data:`COORDINATOR_ID`).
    :param dst: receiver id.
    :param kind: one of :data:`KINDS`.
    :param round: the round it belongs to, numbered across the whole coordinator session
        (pooled agents outlive rounds and ``run`` calls; see the module docstring).
    :param task: the task id it concerns, if any.
    :param body: any JSON value.
    :param ts: wall-clock send time (``time.time()``), for latency figures.
    :param seq: per-sender sequence number (1, 2, ... in each sender process, over every
        kind of message it sends), for ordering checks.
    """

    id: str
    src: str
    dst: str
    kind: str
    round: int = 0
    task: str | None = None
    body: Any = None
    ts: float = 0.0
    seq: int = 0
    #: opaque delivery receipt set by the bus on read; passed back to ``bus.ack``.
    receipt: Any = field(default=None, eq=False, repr=False)

    def encode(self, limit: int | None = None) -> bytes:
        """One wire record, newline-terminated.  Raises MessageTooLarge over ``limit``."""
        data = orjson.dumps(
            {
                "id": self.id,
                "src": self.src,
                "dst": self.dst,
                "kind": self.kind,
                "round": self.round,
                "task": self.task,
                "body": self.body,
                "ts": self.ts,
                "seq": self.seq,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        if limit is not None and len(data) > limit:
            raise MessageTooLarge(
                f"message {self.id} ({self.kind} from {self.src} to {self.dst}) is {len(data)} bytes; "
                f"bus.max_message_bytes allows {limit} (raise it in cfn.toml [bus] or send less)"
            )
        return data


_FIELD_TYPES = {
    "id": str,
    "src": str,
    "dst": str,
    "kind": str,
    "round": int,
}


def decode(line: bytes) -> Message:
    """Parse one wire record (with or without its newline) or raise MalformedMessage."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    # the fast path checks exact types (orjson makes no subclasses; bool is not int here);
    # anything it does not accept goes through _why_malformed, which says what is wrong
    try:
        msg_id, src, dst, kind, rnd = obj["id"], obj["src"], obj["dst"], obj["kind"], obj["round"]
        task = obj.get("task")
        ts = obj.get("ts", 0.0)
        seq = obj.get("seq", 0)
    except (KeyError, TypeError):
        raise _why_malformed(obj) from None
    if (
        type(msg_id) is not str
        or type(src) is not str
        or type(dst) is not str
        or kind not in KINDS
        or type(rnd) is not int
        or (task is not None and type(task) is not str)
        or (type(ts) is not float and type(ts) is not int)
        or type(seq) is not int
    ):
        raise _why_malformed(obj)
    return Message(id=msg_id, src=src, dst=dst, kind=kind, round=rnd, task=task, body=obj.get("body"), ts=float(ts), seq=seq)


def _why_malformed(obj: Any) -> MalformedMessage:
    """The reason a decoded JSON value is not a message (only called for one that is not)."""
    if not isinstance(obj, dict):
        return MalformedMessage("not a JSON object")
    for key, typ in _FIELD_TYPES.items():
        value = obj.get(key)
        if type(value) is not typ:
            return MalformedMessage(f"field {key!r} missing or not {typ.__name__}")
    if obj["kind"] not in KINDS:
        return MalformedMessage(f"unknown kind {obj['kind']!r}")
    task = obj.get("task")
    if task is not None and type(task) is not str:
        return MalformedMessage("field 'task' is not a string")
    ts = obj.get("ts", 0.0)
    if type(ts) is not float and type(ts) is not int:
        return MalformedMessage("field 'ts' is not a number")
    return MalformedMessage("field 'seq' is not an integer")


class MessageFactory:
    """Builds messages from one sender with unique ids and increasing ``seq``.

    A forked or re-started process must create a new factory (the pid is part
    of the id), which :meth:`for_process` takes care of.
    """

    def __init__(self, sender: str):
        self.sender = sender
        self.pid = os.getpid()
        self._seq = itertools.count(1)

    def make(
        self, dst: str, kind: str, *, round: int = 0, task: str | None = None, body: Any = None, id: str | None = None
    ) -> Message:
        """The next message from this sender.

        :param id: a fixed id instead of ``{sender}.{pid}.{seq}``, for a message that must
            keep its id when it is sent again (see :func:`peer_message_id`); ``seq`` is
            taken from this sender's counter either way.
        """
        seq = next(self._seq)
        return Message(
            id=id if id is not None else f"{self.sender}.{self.pid}.{seq}",
            src=self.sender,
            dst=dst,
            kind=kind,
            round=round,
            task=task,
            body=body,
            ts=time.time(),
            seq=seq,
        )


def peer_message_id(round: int, task: str, index: int) -> str:
    """The id of the ``index``-th peer message a task sends in a round.

    Derived from what a replacement of a dead sender knows (its task message), so a
    re-sent peer message has the same id and its receiver counts it once; the
    session-wide round number keeps the ids of a later ``run`` (whose task ids may
    repeat) apart from an earlier one's.
    """
    return f"{task}.r{round}.p{index}"


def user_message_id(sender: str, round: int, task: str, n: int) -> str:
    """The id of the ``n``-th user message (1, 2, ...) a task attempt sends.

    Derived from what a retried attempt knows, so its re-sends carry the ids of the
    first attempt's and their receivers drop them as copies.
    """
    return f"{sender}.{round}.{task}.m{n}"


_FACTORY_ID_RE = re.compile(r"(.+)\.([0-9]+)\.([0-9]+)")


def split_message_id(msg_id: str) -> tuple[str, str, str] | None:
    """``(sender, pid, seq)`` of an id made by :class:`MessageFactory`, or None for any other shape."""
    match = _FACTORY_ID_RE.fullmatch(msg_id)
    return match.groups() if match else None


@define(frozen=True)
class Task:
    """One unit of work for one agent.

    :param id: unique within the run.
    :param payload: handed to the handler (a Python function's argument, or a command's stdin).
    :param peers: agent ids this task sends one peer message each to (mesh workload).
    :param expect: number of peer messages the task must receive before it completes.
    :param role: the role whose agents may run it (``[agents.<role>]``); None: the run's
        default role (``[workload] default_role``, else the first role).  The coordinator
        fills it in before the task is assigned.
    """

    id: str
    payload: Any = None
    peers: tuple[str, ...] = ()
    expect: int = 0
    role: str | None = None

    def body(self) -> dict:
        return {"payload": self.payload, "peers": list(self.peers), "expect": self.expect}


@define(frozen=True)
class TaskResult:
    """What came back for one task.

    :param ok: the handler returned (``False``: it raised, timed out, or the task was lost).
    :param value: the handler's return value (``None`` when not ok).
    :param error: why it failed, for a person to read.
    :param agent: the agent that produced it.
    :param attempts: how many agent incarnations worked on it (>1 after a crash).
    :param peers_received: peer messages this task received (mesh workload).
    :param seconds: handler time inside the agent.
    :param stderr: the tail of a command handler's stderr.
    :param answered: an agent sent this result (``False``: the coordinator gave up on the task).
    :param cancelled: the task was cancelled (``Coordinator.cancel``, ``cfn cancel``): not a failure.
    :param skipped: a task it needed (``after``, ``needs``) failed or was cancelled, so it never ran.
    """

    task: str
    ok: bool
    value: Any = None
    error: str | None = None
    agent: str | None = None
    attempts: int = 1
    peers_received: int = 0
    seconds: float = 0.0
    stderr: str | None = None
    answered: bool = True
    cancelled: bool = False
    skipped: bool = False
