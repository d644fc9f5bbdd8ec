"""The shm bus's reader side: reading an inbox without racing appends, receipts, the settled cursor.

The reader never truncates or rewrites an inbox: it keeps an offset and only
takes records up to the last ``\\n``, so it cannot race with appends, and a
write (a batch) is seen whole or not at all.  A record's receipt is the offset
just past it.  ``cursor/<agent>`` (8 bytes) holds the offset up to which every
record is settled (acked): it advances only over the longest settled prefix, so
a replacement of a dead agent re-reads what its predecessor had not settled.
A record longer than ``max_message_bytes`` is never held whole: it is skipped,
dead-lettered (its first bytes) and settled.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import Iterable

from ..errors import BusError
from .append import RECORD_SEP, TORN_RECORD, record_count
from .rundir import bus_full, check_location, plain_name

#: most bytes a reader holds of an inbox it scans (more only for a batch it returns whole)
_READ_CHUNK = 1 << 20
#: bytes a read asks for first; more only when that much was there (below malloc's mmap threshold)
_FIRST_READ = 1 << 16
#: bytes of a skipped oversized record kept in its dead letter
_DEAD_PREFIX = 4096


class _Inbox:
    """Reader state of one inbox in this process."""

    __slots__ = ("fd", "pos", "pending", "order", "cursor_fd", "acked_to", "tail", "counts", "acked_count")

    def __init__(self, fd: int, pos: int, cursor_fd: int):
        self.counts = None  # [appended, settled] of count/<location> when inbox_depth is on
        self.acked_count = 0  # records settled (up to acked_to)
        self.fd = fd
        self.pos = pos  # next byte to read
        self.pending: dict[int, bool] = {}  # end offset of each unsettled record -> acked
        #: the same offsets in read order: the settled prefix is popped from its left end (a
        #: dict's first key is found by skipping every key deleted before it: quadratic)
        self.order: deque[int] = deque()
        self.cursor_fd = cursor_fd
        self.acked_to = pos
        #: (size, mtime, pos, first bytes) of the file when a read last stopped at a long
        #: unterminated tail (a torn or unfinished write): while all four match it is not scanned again
        self.tail: tuple | None = None



class InboxReader:
    """The read/ack half of :class:`cfn_core.bus.shm.ShmBus` (a mixin).

    Uses the bus's ``files`` (a :class:`~cfn_core.bus.rundir.RunDir`), ``counters``
    (:class:`~cfn_core.bus.depth.InboxCounters`), ``inbox_depth``,
    ``max_message_bytes``, ``run_dir``, ``_inboxes`` and :meth:`dead_letter`.
    """

    def _inbox(self, agent_id: str, location: str) -> _Inbox:
        inbox = self._inboxes.get(agent_id)
        if inbox is None:
            check_location(location)
            if not plain_name(agent_id):
                raise BusError(f"inbox id {agent_id!r:.200} is not a plain name")
            fd = self.files.open(location, os.O_RDONLY | os.O_CREAT)
            try:
                cursor_fd = self.files.open(f"cursor/{agent_id}", os.O_RDWR | os.O_CREAT)
            except BaseException:
                os.close(fd)
                raise
            raw = os.pread(cursor_fd, 8, 0)
            pos = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            inbox = _Inbox(fd, pos, cursor_fd)
            if self.inbox_depth and not agent_id.startswith("_"):
                # recount what is settled: exact even if a predecessor died between two writes
                settled = 0
                for off in range(0, pos, _READ_CHUNK):
                    settled += record_count(os.pread(fd, min(_READ_CHUNK, pos - off), off))
                inbox.counts = self.counters.get(location)
                inbox.acked_count = settled
                inbox.counts[1] = settled
            self._inboxes[agent_id] = inbox
        return inbox

    def read(self, agent_id: str, location: str) -> list[tuple[bytes, int]]:
        """New complete records of the inbox, each with its receipt (its end offset)."""
        inbox = self._inbox(agent_id, location)
        # one pread, no fstat: an empty or small read (the common case) is one system call
        data = os.pread(inbox.fd, _FIRST_READ, inbox.pos)
        if len(data) == _FIRST_READ:
            return self._read_large(agent_id, inbox, data)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        out: list[tuple[bytes, int]] = []
        self._take(inbox, data, end, inbox.pos, out)
        inbox.pos += end + 1
        return out

    @staticmethod
    def _take(inbox: _Inbox, data: bytes, end: int, base: int, out: list) -> None:
        """Append the records of ``data[:end + 1]`` (file offset ``base``; ``data[end]`` is b"\\n")."""
        if RECORD_SEP in data:  # a batch: split its records like lines (same offsets, same length)
            data = data.replace(RECORD_SEP, b"\n")
        start = 0
        pending = inbox.pending
        order = inbox.order.append
        while start <= end:
            nl = data.index(b"\n", start)
            receipt = base + nl + 1
            out.append((data[start : nl + 1], receipt))
            pending[receipt] = False
            order(receipt)
            start = nl + 1

    def _read_large(self, agent_id: str, inbox: _Inbox, first: bytes) -> list[tuple[bytes, int]]:
        """A read that found at least ``_FIRST_READ`` unread bytes: scan them a chunk at a time.

        No record over ``max_message_bytes`` is ever held whole: one with no
        separator within a chunk is skipped by scanning for its end, dead-lettered
        (its first bytes and the reason) and settled.  A long unterminated tail (a
        write torn by its sender's death, or still being written) is scanned once:
        while the file's size, mtime and the tail's first bytes are unchanged, later
        reads return at once.  A sender that repairs a torn tail rewrites its first
        bytes (the torn-write marker), so a repair is always noticed.
        """
        fd = inbox.fd
        st = os.fstat(fd)
        size = st.st_size
        head = first[: len(TORN_RECORD)]
        if inbox.tail == (size, st.st_mtime_ns, inbox.pos, head):
            return []  # the same unterminated tail as last time
        inbox.tail = None
        limit = self.max_message_bytes
        chunk = max(_FIRST_READ, min(limit, _READ_CHUNK))
        # a record longer than a chunk is skipped unread; a shorter one over the limit is read
        # (at most a chunk) and dead-lettered by cfn_core.builtin.decode_records
        longest = max(limit, chunk)
        out: list[tuple[bytes, int]] = []
        off = inbox.pos  # data holds the file's bytes from off
        data = first
        skipped = False
        while True:
            want = min(chunk, size - off) - len(data)
            if want > 0:
                data += os.pread(fd, want, off + len(data))
            nl = data.rfind(b"\n")
            if nl >= 0:
                self._take(inbox, data, nl, off, out)
                off += nl + 1
                data = data[nl + 1 :]
                if off < size:
                    continue
                break
            if off + len(data) >= size:
                break  # an unterminated tail shorter than a chunk
            end, oversized = self._scan_write(fd, off, size, chunk, longest)
            if end is None:
                break  # a long unterminated tail
            self._take_skipping(agent_id, inbox, off, end, oversized, out)
            skipped = True
            off = end
            data = b""
        inbox.pos = off
        if off < size:
            inbox.tail = (size, st.st_mtime_ns, off, data[: len(TORN_RECORD)])
        if skipped:
            self._advance(agent_id, inbox)  # a skipped record is settled now: no replacement re-reads it
        return out

    @staticmethod
    def _scan_write(fd: int, start: int, size: int, chunk: int, longest: int) -> tuple[int | None, list]:
        """Find the end of the write starting at ``start`` without holding more than a chunk.

        Returns the offset just past its b"\\n" (None if there is none before ``size``)
        and the ``(start, end)`` of each of its records longer than ``longest``.  Only
        the first and last separator of each chunk are looked at: two separators
        inside one chunk are less than ``chunk <= longest`` apart.
        """
        oversized = []
        record = start  # where the current record began
        pos = start
        while pos < size:
            buf = os.pread(fd, min(chunk, size - pos), pos)
            if not buf:
                break  # the file shrank (a torn tail was repaired): read again next time
            nl = buf.find(b"\n")
            part = buf if nl < 0 else buf[: nl + 1]
            first = part.find(RECORD_SEP)
            if nl >= 0 and (first < 0 or nl < first):
                first = nl
            if first >= 0:
                last = nl if nl >= 0 else part.rfind(RECORD_SEP)
                if pos + first + 1 - record > longest:
                    oversized.append((record, pos + first + 1))
                record = pos + last + 1
                if nl >= 0:
                    return pos + nl + 1, oversized
            pos += len(buf)
        return None, oversized

    def _take_skipping(self, agent_id: str, inbox: _Inbox, start: int, end: int, oversized: list, out: list) -> None:
        """Append the records of the write ``[start, end)``; dead-letter and settle the oversized ones."""
        fd = inbox.fd
        here = start
        for big_start, big_end in [*oversized, (end, end)]:
            if big_start > here:  # whole records (each ended by a separator): read them
                data = os.pread(fd, big_start - here, here)
                self._take(inbox, data, len(data) - 1, here, out)
            if big_end > big_start:
                prefix = os.pread(fd, min(_DEAD_PREFIX, big_end - big_start), big_start)
                try:
                    self.dead_letter(
                        agent_id,
                        prefix,
                        f"record of {big_end - big_start} bytes exceeds bus.max_message_bytes={self.max_message_bytes}; "
                        f"skipped unread (its first {len(prefix)} bytes kept)",
                    )
                except (BusError, OSError):
                    pass  # a full bus: the record is skipped and settled all the same
                inbox.pending[big_end] = True
                inbox.order.append(big_end)
            here = big_end

    def ack(self, agent_id: str, receipts: Iterable[int]) -> None:
        """Settle records; the cursor moves over the longest settled prefix.

        A receipt may also be ``(inbox_id, receipt)``: a record a plugin read from a
        secondary inbox id on ``agent_id``'s behalf (cfn-shard's split and fallback
        inboxes); it is settled in that inbox.
        """
        inbox = self._inboxes.get(agent_id)
        pending = inbox.pending if inbox is not None else {}
        others: dict[str, list] = {}
        for r in receipts:
            if r in pending:
                pending[r] = True
            elif type(r) is tuple:
                others.setdefault(r[0], []).append(r[1])
        for other, rs in others.items():
            self.ack(other, rs)
        if inbox is not None:
            self._advance(agent_id, inbox)

    def _advance(self, agent_id: str, inbox: _Inbox) -> None:
        """Move the cursor over the longest settled prefix of the inbox's records."""
        pending = inbox.pending
        moved = 0
        order = inbox.order
        while order and pending[order[0]]:
            first = order.popleft()
            del pending[first]
            inbox.acked_to = first
            moved += 1
        if moved:
            try:
                os.pwrite(inbox.cursor_fd, inbox.acked_to.to_bytes(8, "little"), 0)
            except OSError as exc:  # the cursor's first write needs a page of the (full) bus
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise bus_full(self.run_dir, exc, f"cannot record what {agent_id} has settled") from None
                raise
            if inbox.counts is not None:
                inbox.acked_count += moved
                inbox.counts[1] = inbox.acked_count  # senders waiting on a full inbox see room
