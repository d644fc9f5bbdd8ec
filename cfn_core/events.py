"""The event log: what happened in a run, one JSON object per line (docs/EVENTS.md).

``cfn run --events FILE`` (``-``: stdout) and ``Coordinator(config, events=...)`` turn it
on; the coordinator context then holds an :class:`EventLog` as ``ctx.events``.  When it
is off ``ctx.events`` is a log that writes nothing (``open_event_log(None)``), so call
sites need no ``if`` and cost one method call.  Either way the log counts the events of
each type (:attr:`EventLog.counts`): the live snapshot (:mod:`cfn_core.live`) reports
tasks done, failed and retried from those counts.

Every line carries ``"v"`` (the format's version, :data:`VERSION`), ``"ts"`` (Unix time,
seconds) and ``"type"``; the other fields depend on the type and are listed, field by
field, in docs/EVENTS.md (a test runs a coordination and checks the two agree).

Lines are written through a buffer flushed by the coordinator's tick (:meth:`EventLog.tick`,
at most every :data:`FLUSH_SECONDS`) and at close: a run with thousands of tasks a second
does not make a system call per event, and a reader following the file (``tail -f``) is
at most a fraction of a second behind.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import Counter
from typing import IO, Any

import orjson

from .errors import ConfigError

#: the version of the line format; bumped when a field changes meaning or disappears
VERSION = 1
#: seconds between two flushes of the buffer by the coordinator's tick
FLUSH_SECONDS = 0.2
#: bytes buffered before a write, whatever the tick
_BUFFER_BYTES = 64 * 1024


class EventLog:
    """Writes events as JSON Lines to a file (or a stream such as stdout).

    :param target: a path (created or truncated), ``"-"`` for standard output, or an
        open file object (text or binary; flushed, never closed by the log).
    """

    enabled = True

    def __init__(self, target: str | os.PathLike | IO):
        self._owned = False
        self._path: str | None = None
        if isinstance(target, (str, os.PathLike)) and os.fspath(target) == "-":
            target = sys.stdout
        if isinstance(target, (str, os.PathLike)):
            path = os.fspath(target)
            if os.path.isdir(path):
                raise ConfigError(f"events file {path!r} is a directory; name a file in it, e.g. {os.path.join(path, 'events.jsonl')!r}")
            try:
                self._file: IO = open(path, "wb")
            except OSError as exc:
                raise ConfigError(f"events file {path!r}: cannot write it: {exc.strerror}") from None
            self._owned, self._path = True, path
        else:
            self._file = target
        # a text stream (sys.stdout, io.StringIO) gets str; a binary one bytes
        self._text = isinstance(self._file, io.TextIOBase)
        #: events emitted so far, per type (kept whether or not anything is written)
        self.counts: Counter[str] = Counter()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._next_flush = 0.0

    def emit(self, type: str, **fields: Any) -> None:
        """Log one event of ``type`` with ``fields`` (JSON values)."""
        self.counts[type] += 1
        line = orjson.dumps({"v": VERSION, "ts": round(time.time(), 6), "type": type, **fields}, default=str) + b"\n"
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= _BUFFER_BYTES:
            self.flush()

    def tick(self, now: float) -> None:
        """Called by the coordinator's tick (``now``: monotonic): flush when it is time."""
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_SECONDS
            self.flush()

    def flush(self) -> None:
        """Write what is buffered and flush the file."""
        if not self._buffer or self._file is None:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        try:
            self._file.write(data.decode() if self._text else data)
            self._file.flush()
        except (OSError, ValueError) as exc:  # a full disk, a closed pipe: the run goes on without its log
            import logging

            logging.getLogger("cfn").warning("event log: cannot write (%s); no more events are logged", exc)
            self._file = None

    def close(self) -> None:
        """Flush, and close the file if the log opened it (:meth:`reopen` appends to it again)."""
        self.flush()
        if self._owned and self._file is not None:
            self._file.close()
            self._file = None

    def reopen(self) -> None:
        """A coordinator opened again after ``close``: go on appending to the same file."""
        if self._owned and self._file is None and self._path is not None:
            try:
                self._file = open(self._path, "ab")
            except OSError as exc:
                raise ConfigError(f"events file {self._path!r}: cannot write it: {exc.strerror}") from None


class _NoEvents(EventLog):
    """The log when none was asked for: it only counts."""

    enabled = False

    def __init__(self) -> None:
        self._file = None
        self.counts = Counter()

    def emit(self, type: str, **fields: Any) -> None:
        self.counts[type] += 1

    def tick(self, now: float) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def reopen(self) -> None:
        pass


def open_event_log(target: str | os.PathLike | IO | EventLog | None) -> EventLog:
    """An :class:`EventLog` for what ``Coordinator(events=...)`` was given (None: one that writes nothing)."""
    if target is None:
        return _NoEvents()
    if isinstance(target, EventLog):
        return target
    return EventLog(target)
