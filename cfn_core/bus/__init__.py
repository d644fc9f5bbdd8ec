"""The transport interface.  ``cfn_bus`` returns an object with these methods.

The kernel's embedded transport is :class:`cfn_core.bus.shm.ShmBus` (files
under /dev/shm); cfn-redis provides one on Redis Streams.  A *location* is what
``cfn_route`` returned for an agent id (for the shm bus a path relative to the
run directory, for Redis a stream key suffix); the bus never decides where an
inbox lives, so sharding works with any transport.

Delivery contract every transport keeps:

* ``deliver(dst, location, records)`` lands all ``records`` (encoded
  messages, each ending in ``\\n``) in the inbox at once and in order, or none
  of them (it raises), then wakes ``dst``.
* ``read(agent_id, location)`` returns ``(record, receipt)`` pairs not yet
  returned to this process, oldest first; a record is only ever complete.
* ``ack(agent_id, receipts)`` settles records.  A record that was read but
  not acked is read again by the next incarnation of the same agent id:
  at-least-once delivery across crashes.
"""

from __future__ import annotations

from typing import Iterable, Protocol


class Bus(Protocol):
    """What a transport offers to the kernel and to plugins (both sides)."""

    #: short name shown in summaries ("shm", "redis")
    name: str
    #: where the run lives (a directory for shm, a key prefix for redis)
    run_id: str

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        """Append ``records`` to ``dst``'s inbox at ``location`` atomically, then wake ``dst``."""

    def read(self, agent_id: str, location: str) -> list[tuple[bytes, object]]:
        """Return new complete records of the inbox with their receipts."""

    def ack(self, agent_id: str, receipts: Iterable[object]) -> None:
        """Mark records settled: a later incarnation of ``agent_id`` will not read them again."""

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        """Block until ``agent_id`` is woken or ``timeout`` passes; True if woken.

        The contract agents rely on: every record appended after the reader's
        previous wake-up wakes it (again), so a reader that reads everything
        after each wake-up never sleeps on unread records.  A spurious wake-up
        is allowed (the reader then finds nothing and waits again).
        """

    def wake_fd(self, agent_id: str) -> int:
        """A file descriptor that becomes readable when ``agent_id`` is woken (for selectors)."""

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        """Keep a malformed record aside with the reason, counted by :meth:`dead_letter_count`."""

    def dead_letter_count(self) -> int:
        """Number of dead-lettered records in the whole run."""

    def put_state(self, key: str, data: bytes) -> None:
        """Store a small value visible to every process of the run (atomically replaced)."""

    def get_state(self, key: str) -> bytes | None:
        """Read a value stored with :meth:`put_state`, or None."""

    def close(self) -> None:
        """Release this process's file descriptors and connections."""

    def destroy(self) -> None:
        """Remove the run (coordinator only, at the end)."""
