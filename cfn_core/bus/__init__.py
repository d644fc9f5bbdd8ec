"""The transport interface: what ``cfn_bus`` returns, the whole of what the kernel, agents and plugins use.

A third party writes a transport from this page alone: a class with every
member of :class:`Bus` below, returned by a plugin's ``cfn_bus`` hook
implementation (see docs/PLUGIN_GUIDE.md, "Writing a transport").
``tests/dir_bus.py`` is such a transport, written only against this page, and
passes the same acceptance tests as the kernel's own
(:class:`cfn_core.bus.shm.ShmBus`, files under /dev/shm); cfn-redis builds
its Redis Streams transport on the shm bus's public methods.

Words used below:

* An *inbox id* names a reader: an agent id (:func:`cfn_core.check_agent_id`),
  a kernel inbox starting with ``_`` (``_coordinator``) or a plugin's
  secondary inbox (``agent-0001.fb``): letters, digits, ``_ . -``.
* A *location* is what ``cfn_route`` returned for an inbox id: plain names
  joined by ``/`` (``inbox/agent-0001``, ``shard-3/agent-0001``).  The bus
  never decides where an inbox lives, so sharding works with any transport;
  every process computes the same location for the same id.
* A *record* is one encoded message, bytes ending in ``\\n`` (JSON, so it
  contains no other newline and no byte ``0x1e``).
* A *receipt* is whatever :meth:`Bus.read` returned with a record; only the
  bus that made it interprets it.  It is never a tuple: the pair
  ``(inbox_id, receipt)`` is how a plugin hands back a record of another
  inbox (see :meth:`Bus.ack`).

How the kernel drives a bus (both sides run the same plugins):

* the coordinator calls ``cfn_bus(config, run_ref=None)``: the bus creates a
  new private run; the coordinator stores its configuration with
  ``put_state("config", ...)``, then ``listen``\\ s on its inbox;
* every agent process is started with ``run_ref`` and calls
  ``cfn_bus(config, run_ref)``; it ``listen``\\ s, then loops: ``read``,
  handle, ``deliver`` what it produced, ``ack`` what it consumed, ``wait``;
* at the end the coordinator calls ``destroy``; every process calls ``close``.

Errors: a transport raises :class:`cfn_core.BusError` (one line naming what
and where) when it cannot do what was asked (full, gone, refused); a sender
of a bounded inbox may raise :class:`cfn_core.InboxFull`.  Any other
exception is a bug.  Bytes that are not a valid message are never a reason
to raise from :meth:`Bus.read`: the kernel decodes them and dead-letters them.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable


class Bus(Protocol):
    """Every member the kernel, agents and bundled plugins use on ``ctx.bus``.

    Objects are used by one thread at a time, except that :meth:`deliver` may
    be called from a second thread (cfn-batch's flusher) while the first reads.
    """

    #: short name shown in summaries ("shm", "redis")
    name: str
    #: identifies the run in summaries and metrics (a directory name, a Redis run id)
    run_id: str
    #: What an agent process is started with (``--run``, ``CFN_RUN``) to join this run:
    #: the path of a local directory, private to this user (mode 0700), in which the
    #: coordinator's ``put_state("config", data)`` is the file ``state/config``.  Agents
    #: started by the kernel read their configuration from that file before any plugin
    #: (so before any ``cfn_bus``) is loaded; a transport whose state lives elsewhere keeps
    #: a local spool directory for it (cfn-redis does).
    run_ref: str
    #: Whether the latest :meth:`deliver` in this process wrote its records.  Only read
    #: after a deliver that raised something other than BusError (an interrupt: a signal
    #: handler that raised after the write): True means the records are in the inbox and
    #: must not be sent again.  A transport whose deliver cannot be interrupted after the
    #: write sets it True as deliver's last step.
    last_written: bool
    #: Whether the records of an inbox may be spread over several locations: ``deliver``
    #: writes at the location its caller gives, and ``read(inbox_id, location)`` returns
    #: what was delivered there whatever ``inbox_id`` (a name of the reader's choosing),
    #: receipts acked as ``(inbox_id, receipt)``.  cfn-shard then splits the
    #: coordinator's inbox into one location per shard.  False for a transport that
    #: routes by ``dst`` alone (cfn-redis: a stream per inbox).
    split_inboxes: bool
    #: None, or a dict set by a plugin to measure contention: :meth:`deliver` then adds the
    #: nanoseconds it waited for another process (a lock held) under the location's
    #: directory (the location up to its last ``/``).  A transport without such waits
    #: never adds anything.
    lock_wait: dict[str, int] | None

    # ------------------------------------------------------------------ sending

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        """Append ``records`` to inbox ``dst`` at ``location``, then wake ``dst``.

        Atomic: a reader gets all of ``records``, consecutive and in this
        order, or none of them; when deliver raises, none were delivered
        (see :attr:`last_written` for an interrupt).  Ordered: the records of
        one sender to one inbox are read in the order they were delivered.
        Records of different senders interleave only between deliver calls.
        Must not block on the reader, except that a transport bounding its
        inboxes may wait for room and then raise :class:`cfn_core.InboxFull`.
        ``dst`` and ``location`` may come from a message: refuse (BusError) an
        id or location that is not plain names.
        """

    # ------------------------------------------------------------------ receiving

    def listen(self, agent_id: str) -> None:
        """Start receiving wake-ups for inbox ``agent_id``.

        Called once by the reader before its first :meth:`read`; every record
        delivered after listen returns must wake the reader, so none is missed
        between the first read and the first wait.
        """

    def read(self, agent_id: str, location: str) -> list[tuple[bytes, object]]:
        """The records of the inbox not yet returned to this process, oldest first, with their receipts.

        Never blocks; returns ``[]`` when there is nothing new.  A record is
        returned whole or not at all, and only once per process.  A new
        process reading the same inbox id (the replacement of a dead agent)
        starts with every record that was not acked.
        """

    def ack(self, agent_id: str, receipts: Iterable[object]) -> None:
        """Settle records: no later reader of inbox ``agent_id`` gets them again.

        A record read but not acked is read again by the next process that
        reads the inbox (at-least-once across crashes).  Receipts may be acked
        in any order and in any number of calls; an unknown receipt is ignored.
        A receipt may also be the pair ``(inbox_id, receipt)``: a record a
        plugin read from another inbox id on ``agent_id``'s behalf (cfn-shard's
        split and fallback inboxes); it is settled in inbox ``inbox_id``.
        """

    def unread_bytes(self, agent_id: str, location: str) -> int:
        """How much of the inbox a replacement reader would get (0 when everything is settled).

        Any unit whose zero means "nothing unsettled" (the shm bus counts bytes).
        """

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        """Block until ``agent_id`` is woken or ``timeout`` seconds pass (None: no limit); True if woken.

        The contract readers rely on: every record delivered after the
        reader's previous wake-up wakes it (again), so a reader that reads
        everything after each wake-up never sleeps on unread records.  A
        spurious wake-up is allowed (the reader then finds nothing and waits
        again).
        """

    def wake_fd(self, agent_id: str) -> int:
        """A file descriptor that becomes readable when ``agent_id`` is woken (for a selector).

        The same promise as :meth:`wait`.  After it became readable the caller
        calls :meth:`drain_wakeups`, then reads.  The descriptor stays the bus's
        (closed by :meth:`close`).
        """

    def drain_wakeups(self, agent_id: str) -> None:
        """Make :meth:`wake_fd` unreadable again (consume the pending wake-ups); never blocks.

        Called after the descriptor became readable and before reading, so a
        record delivered after the drain wakes it again.
        """

    # ------------------------------------------------------------------ dead letters and shared state

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        """Keep a malformed record of inbox ``agent_id`` aside with the reason.

        Counted by :meth:`dead_letter_count` in every process of the run.  The
        caller acks the record itself.  A transport may keep only a prefix of
        a long record.
        """

    def dead_letter_count(self) -> int:
        """Number of dead-lettered records in the whole run (all processes, all inboxes)."""

    def dead_letters(self) -> list[dict]:
        """Every dead letter of the run: dicts with at least ``"reason"`` and ``"raw_b64"`` (for tools and tests)."""

    def put_state(self, key: str, data: bytes) -> None:
        """Store a small value visible to every process of the run, replaced atomically.

        ``key`` is an agent-id-like name; a reader sees the old value or the
        new one, never a part.
        """

    def get_state(self, key: str) -> bytes | None:
        """A value stored with :meth:`put_state` (by any process of the run), or None."""

    def get_local_state(self, key: str) -> bytes | None:
        """The file ``state/<key>`` of the local run directory (:attr:`run_ref`), or None.

        What a command on the coordinator's machine writes there to ask something of the
        run (``cfn stop`` writes ``state/stop``): the same as :meth:`get_state` for a bus
        whose state is that directory; a bus whose state lives elsewhere (cfn-redis) still
        reads this from its local spool.
        """

    def free_bytes(self) -> int | None:
        """Bytes the transport can still store, or None if it cannot tell (named in errors on a full bus)."""

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release this process's descriptors and connections; the run goes on for the others."""

    def destroy(self) -> None:
        """Close and remove the whole run (coordinator only, at the end): nothing of it is left."""


@runtime_checkable
class SharedWakeups(Protocol):
    """Optional: many inboxes woken through one doorbell (hosted agents, docs/HOSTING.md).

    A host process serves thousands of agents; with a doorbell per inbox it would hold
    a socket and a descriptor per agent.  A transport that implements these members lets
    it listen once: the kernel checks ``isinstance(bus, SharedWakeups)`` and otherwise
    falls back to :meth:`Bus.listen` / :meth:`Bus.wake_fd` per agent.
    """

    def listen_shared(self, agent_id: str, bell_id: str) -> None:
        """From now on every wake-up of inbox ``agent_id`` wakes ``bell_id`` (which this process listens on).

        The same promise as :meth:`Bus.listen` (every record delivered after it returns
        wakes ``bell_id``), and :meth:`woken` tells which inbox was rung.
        """

    def woken(self, bell_id: str) -> list[str] | None:
        """The inbox ids whose wake-ups reached ``bell_id`` since the last call (never blocks).

        Also makes ``bell_id``'s :meth:`Bus.wake_fd` unreadable, like
        :meth:`Bus.drain_wakeups`.  None means "some may be missing": the caller reads
        every inbox it serves.
        """

    def forget(self, agent_id: str, *, idle: bool = False) -> None:
        """Drop this process's reader state of inbox ``agent_id`` (its descriptors, its position).

        The next read starts again at the settled position: records read and not acked
        are returned again, as to a replacement process (a hosted agent restarted in its
        host).  With ``idle``, only when nothing read is unsettled (nothing is read twice).
        """


@runtime_checkable
class ManyDeliveries(Protocol):
    """Optional: many deliveries in one call, their wake-ups grouped (docs/HOSTING.md, "Rings grouped per host").

    The builtin ``cfn_send`` calls it for a send of several messages (the coordinator's
    tasks of a round) when the bus has it, and otherwise calls :meth:`Bus.deliver` for
    each.  A host process writes its agents' records of one turn with it.
    """

    def deliver_many(self, batches: Iterable[tuple[str, str, list[bytes]]]) -> None:
        """:meth:`Bus.deliver` each ``(dst, location, records)``, in order, with its guarantees.

        ``batches`` may be a generator (consumed once, one item at a time).  A transport may
        wake the readers later than each append (grouped), but never later than the call's
        return, and never while it waits for room in an inbox that holds records it has
        not woken the reader for.  When a delivery raises, those before it are delivered
        and woken, and none after it is attempted.
        """

