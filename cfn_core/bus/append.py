"""The shm bus's inbox file format and its one locked append, with the one torn-write policy.

An inbox is an append-only file of *writes*.  A write is a batch: its records
are joined by :data:`RECORD_SEP` (ASCII record separator, which JSON never
contains unescaped) and only its last record ends in ``\\n``.  A reader only
takes data up to the last ``\\n``, so it sees a write whole or not at all, and
every record keeps the offset just past its separator as its receipt.

:func:`append_locked` is the only code that writes to an inbox (the kernel's
senders and cfn-redis's relay both go through
:meth:`cfn_core.bus.shm.ShmBus.append`).  Under the inbox's ``flock`` it keeps
three promises:

* **Torn writes are replaced by a marker.**  A sender killed in the middle of
  a write (SIGKILL can cut a write to tmpfs at a page boundary) leaves a tail
  without ``\\n``.  The next writer truncates that tail back to the last
  ``\\n`` and appends :data:`TORN_RECORD` in its place, which the reader
  dead-letters: its sender never saw it sent, so nothing sent is lost, and a
  half batch is never visible.
* **A failed write is rolled back.**  If the write fails half way (a full
  disk: ``ENOSPC``) the file is truncated back to where it was, so no half
  record is ever visible; the caller gets the error.
* **Inbox counts are kept.**  With backpressure on, the inbox's appended
  count grows by the records written (the torn marker included), so readers'
  settled counts and senders' depth checks agree.
"""

from __future__ import annotations

import os

#: joins the records of one write; only the write's last record ends in b"\n"
RECORD_SEP = b"\x1e"
#: what replaces a write torn by its sender's death (dead-lettered by the reader)
TORN_RECORD = b"\x1ftorn write: its sender died while writing it\n"


def join_records(records: list[bytes]) -> bytes:
    """One write of ``records`` (each ending in ``\\n``): every newline but the last becomes a separator.

    The data has the same length as the records back to back, so each record's
    end offset is the same either way.
    """
    if len(records) == 1:
        return records[0]
    return b"".join(records).replace(b"\n", RECORD_SEP, len(records) - 1)


def record_count(data: bytes) -> int:
    """Records ending in ``data`` (each ends in a record separator or a newline)."""
    return data.count(b"\n") + data.count(RECORD_SEP)


def end_of_last_write(fd: int, size: int) -> int:
    """Offset just past the last ``\\n`` before ``size`` (0 if none): where the torn write began."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def append_locked(fd: int, data: bytes, status, counts=None, n: int = 0, before_write=None) -> int:
    """Append the write ``data`` to the inbox open at ``fd``, all of it or nothing.

    The caller holds the inbox's ``flock``.  Returns the offset at which
    ``data`` starts.  On an :class:`OSError` the file is truncated back and the
    error raised (the caller names it: a full bus, ...).

    :param status: an object whose ``last_written`` is set to True once ``data``
        is whole in the file, also when an interrupt (a signal handler that
        raises) arrives right after the write: then the exception propagates
        and the caller must not write ``data`` again.
    :param counts: the inbox's shared ``[appended, settled]`` counters, or None
        (no backpressure); ``n`` records are added to ``appended``.
    :param before_write: called with the start offset once it is known and
        before ``data`` is written (a journal of where records will be).
    """
    size = os.fstat(fd).st_size
    torn = 0
    writing = False
    try:
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # a sender died in the middle of a write: remove the torn write whole (a batch
            # is visible all or nothing) and leave one malformed record in its place
            size = end_of_last_write(fd, size)
            os.ftruncate(fd, size)
            os.write(fd, TORN_RECORD)
            size += len(TORN_RECORD)
            torn = 1
        if before_write is not None:
            before_write(size)
        writing = True
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
        status.last_written = True
    except OSError:
        os.ftruncate(fd, size)  # no half-written batch is ever visible
        raise
    except BaseException:
        # A signal handler raised (Ctrl-C, the CLI's SIGTERM): Python runs it as a system
        # call returns, so it may be right after the write.  A whole write stays (a reader
        # may have read it already) and last_written says so; a partial one is removed.
        if writing and os.fstat(fd).st_size == size + len(data):
            status.last_written = True
            if counts is not None:
                counts[0] += torn + n
        else:
            os.ftruncate(fd, size)
        raise
    if counts is not None:
        counts[0] += torn + n  # one aligned 8-byte store
    return size
