"""The embedded transport: inbox files under /dev/shm, doorbell sockets for wake-ups.

Layout of one run (``/dev/shm/cfn-<random>/``, mode 0700)::

    owner.json            coordinator pid and process start time (for `cfn clean`)
    config.json           the resolved configuration every agent loads
    <location>            one append-only inbox file per agent (location from cfn_route,
                          e.g. ``inbox/agent-0001`` or ``shard-3/agent-0001``)
    cursor/<agent>        8 bytes: inbox offset up to which every record is settled (acked)
    bell/<agent>          the agent's doorbell: a unix datagram socket
    dead/<agent>.jsonl    dead-lettered records with the reason
    count/<location>      two uint64 per inbox when ``[bus] inbox_depth`` is on, shared
                          through mmap: records appended (written by senders under the
                          inbox's flock) and records settled (written by its reader)
    state/<key>           small shared values (put_state/get_state)

Why it cannot lose a message:

* A sender appends under ``flock`` with one ``write`` of whole records.  If the
  write fails half way (disk full) the file is truncated back to where it was,
  still under the lock, so no half record is ever visible.
* A write is a batch: its records are joined by ``\\x1e`` (ASCII record
  separator, which JSON never contains unescaped) and only its last record
  ends in ``\\n``.  The reader only takes data up to the last ``\\n``, so it
  sees a batch whole or not at all.  A sender killed in the middle of a write
  (SIGKILL can cut a write to tmpfs at a page boundary) leaves a torn tail
  without ``\\n``; the next sender, under the lock, truncates that tail back
  to the last ``\\n`` and appends one malformed marker record in its place,
  which the reader dead-letters (its sender never saw it sent).
* The reader never truncates or rewrites: it keeps an offset and only takes
  records up to the last ``\\n``, so it cannot race with appends.
* The cursor advances only over acked records, so a replacement of a dead agent
  re-reads what its predecessor had not settled.

Backpressure (``[bus] inbox_depth``): a sender holding the inbox's flock
compares the inbox's appended-record count with its reader's settled count
(two aligned integers in a shared mapping: no system call) and, when ``depth`` records are unsettled,
lets go of the lock and waits, bounded by ``full_timeout``, before raising
:class:`~cfn_core.errors.InboxFull`.  Because the check and the append happen
under the same lock, the depth holds under any number of concurrent senders.
The coordinator's inboxes (ids starting with ``_``) are not limited: they are
the fan-in of every result and the coordinator drains them continuously.  A
new reader incarnation recounts the settled records from the file, so a
crash between two counter writes cannot shrink an inbox for good.

Wake-ups: after appending, the sender sends one byte to the receiver's
doorbell socket (non-blocking; a full queue means a wake-up is already
pending).  The receiver binds its doorbell *before* its first read, so no
wake-up can be lost, and sleeps in ``recv`` on it without polling.  Every
record appended after a wake-up rings again, so an agent reads once per
wake-up and goes back to sleep: it never needs to read again "in case".
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import mmap
import os
import re
import select
import socket
import stat
import sys
import tempfile
import termios
import time
from collections import deque
from pathlib import Path
from typing import Iterable

from ..errors import BusError, InboxFull
from ..messages import check_agent_id

_MAX_CACHED_FDS = 512
#: doorbell paths a sender keeps (a string each; cleared when full)
_MAX_CACHED_ADDRS = 4096
_BELL_NAME_MAX = 32  # unix socket paths are limited to 107 bytes
#: what an inbox id, a destination and each part of a location may be: an agent id
#: (cfn_core.messages.check_agent_id), a kernel inbox (``_coordinator``, ``_relay``), a
#: reader's secondary inbox (``agent-0001.fb``) or a directory (``inbox``, ``shard-3``)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def _plain_name(name: str) -> bool:
    """Can ``name`` be one file name in the run directory (no path, no ``..``, not too long)?"""
    return type(name) is str and _NAME_RE.match(name) is not None and ".." not in name


def bell_name(agent_id: str) -> str:
    """The doorbell socket's file name: the id itself, or a hash of a long id."""
    if len(agent_id) <= _BELL_NAME_MAX:
        return agent_id
    import hashlib

    return "h" + hashlib.blake2b(agent_id.encode(), digest_size=15).hexdigest()
#: most bytes a reader holds of an inbox it scans (more only for a batch it returns whole)
_READ_CHUNK = 1 << 20
#: bytes a read asks for first; more only when that much was there (below malloc's mmap threshold)
_FIRST_READ = 1 << 16
#: bytes of a skipped oversized record kept in its dead letter
_DEAD_PREFIX = 4096
#: joins the records of one write; only the write's last record ends in b"\n"
RECORD_SEP = b"\x1e"
#: what replaces a write torn by its sender's death (dead-lettered by the reader)
TORN_RECORD = b"\x1ftorn write: its sender died while writing it\n"


def _record_count(data: bytes) -> int:
    """Records ending in ``data`` (each ends in a record separator or a newline)."""
    return data.count(b"\n") + data.count(RECORD_SEP)


def _end_of_last_write(fd: int, size: int) -> int:
    """Offset just past the last ``\\n`` before ``size`` (0 if none): where the torn write began."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def default_root() -> str:
    """/dev/shm when it is a writable directory, else the system temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def _proc_start_time(pid: int) -> str | None:
    """The process start time from /proc (clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # field 22, counted after the parenthesised command name
    return data.rsplit(b")", 1)[1].split()[19].decode()


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


class ShmBus:
    """Inbox files under a private run directory.  See the module docstring."""

    name = "shm"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        max_message_bytes: int = 1 << 20,
        owner: bool = False,
        inbox_depth: int = 0,
        full_timeout: float = 30.0,
    ):
        # absolute: doorbell addresses and paths must survive a handler's chdir
        self.run_dir = Path(os.path.abspath(run_dir))
        #: most unsettled records an agent's inbox may hold (0: unlimited); see the module docstring
        self.inbox_depth = inbox_depth
        #: seconds a sender waits for room in a full inbox before raising InboxFull
        self.full_timeout = full_timeout
        self._counts: dict[str, tuple] = {}  # location -> (address, [appended, settled])
        self.run_id = self.run_dir.name
        self.max_message_bytes = max_message_bytes
        self.owner = owner
        self._append_fds: dict[str, int] = {}
        self._inboxes: dict[str, _Inbox] = {}
        self._bells: dict[str, socket.socket] = {}
        self._ringer: socket.socket | None = None
        self._ringer_sndbuf = 0
        self._bell_addrs: dict[str, str] = {}  # receiver id -> its doorbell's path (built once)
        #: whether the latest ``deliver`` wrote its records (whole).  Read after a deliver that
        #: raised: an interrupt (a signal handler that raises) can arrive after the write and
        #: before deliver returns, and a caller that keeps records until they are written
        #: (cfn-batch) must then not send them again.  A BusError always means not written.
        self.last_written = False
        #: rings retried from a fresh socket because the old one's send buffer was full (see ring)
        self.rings_retried = 0
        self._dead_fds: dict[str, int] = {}
        self._dir_fds: dict[tuple, int] = {}  # ("inbox",) -> descriptor of run_dir/inbox, () -> run_dir
        self._bell_prefix = os.path.join(os.fspath(self.run_dir), "bell", "")
        self._pid = os.getpid()
        #: set to a dict to measure lock contention: ``deliver`` then adds the time it waited
        #: for an inbox's flock held by another process, in nanoseconds, under the inbox's
        #: directory (cfn-shard uses it)
        self.lock_wait: dict[str, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls, root: str | None = None, *, max_message_bytes: int = 1 << 20, inbox_depth: int = 0, full_timeout: float = 30.0
    ) -> "ShmBus":
        """Make a new private run directory (coordinator side).

        The run directory's path is absolute whatever ``root`` is, so agents and
        their doorbells find it after a handler changes directory.  On any
        failure (a full or read-only root) nothing is left under ``root``.
        """
        root = os.path.abspath(root or default_root())
        if not os.path.isdir(root):
            raise BusError(f"bus root {root!r} is not a directory (set [bus] root in cfn.toml)")
        try:
            run_dir = tempfile.mkdtemp(prefix="cfn-", dir=root)  # mode 0700, unpredictable name
        except OSError as exc:
            raise BusError(f"cannot create a run directory under {root!r}: {exc.strerror}") from None
        longest = len(os.path.join(run_dir, "bell", "x" * _BELL_NAME_MAX))
        if longest > 107:
            os.rmdir(run_dir)
            raise BusError(
                f"bus root {root!r} is too long for doorbell sockets (paths up to 107 bytes); use a shorter [bus] root"
            )
        try:
            for sub in ("cursor", "bell", "dead", "state", "count"):
                os.mkdir(os.path.join(run_dir, sub), 0o700)
            bus = cls(run_dir, max_message_bytes=max_message_bytes, owner=True, inbox_depth=inbox_depth, full_timeout=full_timeout)
            me = os.getpid()
            bus._write_atomic(
                Path(run_dir) / "owner.json",
                json.dumps({"pid": me, "start": _proc_start_time(me), "created": time.time()}).encode(),
            )
        except BaseException as exc:
            remove_tree(run_dir)
            if isinstance(exc, OSError):
                raise BusError(f"cannot set up a run directory under {root!r}: {exc.strerror}") from None
            raise
        return bus

    @classmethod
    def attach(
        cls, run_dir: str | os.PathLike, *, max_message_bytes: int = 1 << 20, inbox_depth: int = 0, full_timeout: float = 30.0
    ) -> "ShmBus":
        """Open an existing run directory (agent side) after checking it is private and ours."""
        run_dir = os.fspath(run_dir)
        check_private_dir(run_dir)
        return cls(run_dir, max_message_bytes=max_message_bytes, inbox_depth=inbox_depth, full_timeout=full_timeout)

    def after_fork(self) -> None:
        """Forget descriptors inherited through fork (a forked agent opens its own)."""
        self.close()
        self._pid = os.getpid()

    def close(self) -> None:
        """Close every descriptor this process holds for the run."""
        for fd in self._append_fds.values():
            _close(fd)
        for fd in self._dead_fds.values():
            _close(fd)
        for fd in self._dir_fds.values():
            _close(fd)
        for inbox in self._inboxes.values():
            _close(inbox.fd)
            _close(inbox.cursor_fd)
        self._unmap_counts()
        for sock in self._bells.values():
            sock.close()
        if self._ringer is not None:
            self._ringer.close()
        self._append_fds, self._dead_fds, self._inboxes, self._bells, self._dir_fds = {}, {}, {}, {}, {}
        self._ringer = None

    def destroy(self) -> None:
        """Close and remove the run directory (coordinator only)."""
        self.close()
        remove_tree(self.run_dir)

    # ------------------------------------------------------------------ sending

    def _path(self, location: str) -> Path:
        self._check_location(location)
        return self.run_dir / location

    @staticmethod
    def _check_location(location: str) -> None:
        """Refuse a location that is not plain names joined by ``/`` (checked once per location)."""
        parts = location.split("/")
        if location.startswith("/") or ".." in parts:
            raise BusError(f"inbox location {location!r} escapes the run directory")
        if not all(_plain_name(part) for part in parts):
            raise BusError(
                f"inbox location {location!r:.200} is not plain names joined by '/' "
                "(letters, digits, '_', '.', '-', up to 128 each)"
            )

    def _open_in_run(self, rel: str, flags: int) -> int:
        """Open ``run_dir/rel`` following no symlink below (or at) the run directory.

        Missing directories are created (mode 0700) when ``flags`` has ``O_CREAT``.
        A symlink, or anything but a regular file (a FIFO would block the open),
        planted at any component is refused with a BusError: nobody can redirect
        or jam an inbox, cursor or state file.  The directories are opened once
        per process and kept (:meth:`_dir_fd`): a process writes to hundreds of
        inboxes, and walking the path for each first write cost three opens and
        three closes (20 us of a mesh agent's 30 us first send to an inbox).
        """
        *dirs, name = rel.split("/")
        dfd = self._dir_fd(tuple(dirs), flags & os.O_CREAT)
        try:
            # O_NONBLOCK: opening a FIFO planted here must not hang us (no effect on regular files)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise BusError(
                    f"refusing {self.run_dir / rel}: a symlink or non-directory was planted in the run directory"
                ) from None
            if exc.errno == errno.ENOENT and flags & os.O_CREAT:  # a kept directory was removed
                for kept in [d for d in self._dir_fds if d[: len(dirs)] == tuple(dirs)]:
                    _close(self._dir_fds.pop(kept))  # opened afresh next time (it may be made again)
                if not os.path.isdir(self.run_dir):
                    raise BusError(f"run directory {self.run_dir} does not exist (its coordinator has ended)") from None
                raise BusError(f"cannot create {self.run_dir / rel}: its directory was removed") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BusError(f"refusing {self.run_dir / rel}: not a regular file (something was planted there)")
        return fd

    def _dir_fd(self, dirs: tuple, create: int) -> int:
        """A kept descriptor of ``run_dir/dirs...`` opened without following symlinks (made if ``create``)."""
        fd = self._dir_fds.get(dirs)
        if fd is not None:
            return fd
        dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        if not dirs:
            try:
                fd = os.open(self.run_dir, dir_flags)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BusError(f"run directory {self.run_dir} is not a plain directory (a symlink was planted there)") from None
                if exc.errno == errno.ENOENT:
                    raise BusError(f"run directory {self.run_dir} does not exist (its coordinator has ended)") from None
                raise
        else:
            parent = self._dir_fd(dirs[:-1], create)
            part = dirs[-1]
            try:
                try:
                    fd = os.open(part, dir_flags, dir_fd=parent)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o700, dir_fd=parent)
                    except FileExistsError:
                        pass
                    fd = os.open(part, dir_flags, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BusError(
                        f"refusing {self.run_dir.joinpath(*dirs)}: a symlink or non-directory was planted in the run directory"
                    ) from None
                raise
        self._dir_fds[dirs] = fd
        return fd

    def _append_fd(self, location: str) -> int:
        fd = self._append_fds.get(location)
        if fd is None:
            self._check_location(location)
            fd = self._open_in_run(location, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            if len(self._append_fds) >= _MAX_CACHED_FDS:
                _close(self._append_fds.pop(next(iter(self._append_fds))))
            self._append_fds[location] = fd
        return fd

    def _count_map(self, location: str):
        """``[appended, settled]`` record counts of an inbox, shared by every process of the run.

        Mapped with libc's mmap rather than :mod:`mmap`, which would keep one
        duplicate file descriptor per inbox open for the life of the mapping.
        """
        entry = self._counts.get(location)
        if entry is None:
            fd = self._open_in_run(f"count/{location}", os.O_RDWR | os.O_CREAT)
            try:
                # allocate the page now: a store into a mapping of a full tmpfs would be a SIGBUS
                os.posix_fallocate(fd, 0, 16)
                addr = _libc_mmap(fd)
            except OSError as exc:
                raise BusError(f"bus {self.run_dir} cannot hold the counters of inbox {location}: {exc.strerror}") from None
            finally:
                os.close(fd)
            entry = self._counts[location] = (addr, (ctypes.c_uint64 * 2).from_address(addr))
        return entry[1]

    def _unmap_counts(self) -> None:
        maps = list(self._counts.values())
        self._counts = {}
        for inbox in self._inboxes.values():
            inbox.counts = None
        for addr, _ in maps:
            _LIBC.munmap(addr, 16)

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        """Append all ``records`` under one lock, atomically, then ring ``dst``'s doorbell.

        With ``inbox_depth`` set, waits (up to ``full_timeout``) while the inbox
        holds that many unsettled records, then raises :class:`InboxFull`.
        """
        self.last_written = False
        if dst not in self._bell_addrs:
            self._bell_addr(dst)  # checks dst (defence in depth: a destination may come from a message)
        data = records[0] if len(records) == 1 else b"".join(records).replace(b"\n", RECORD_SEP, len(records) - 1)
        fd = self._append_fd(location)
        depth = self.inbox_depth
        counts = self._count_map(location) if depth and not dst.startswith("_") else None
        n = len(records) if counts is not None else 0
        deadline = None
        delay = 0.0005
        while True:
            stats = self.lock_wait
            if stats is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                try:  # uncontended: no wait to count (not even the system call's own time)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process holds it: time the wait
                    t0 = time.perf_counter_ns()
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    key = location.rpartition("/")[0] or location
                    stats[key] = stats.get(key, 0) + time.perf_counter_ns() - t0
            unread = 0
            try:
                if counts is not None:
                    unread = counts[0] - counts[1]
                    if not (unread > 0 and unread + n > depth):
                        unread = 0
                if not unread:
                    self._append_locked(fd, dst, data, len(records), counts, n)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not unread:
                break
            # full: wait without the lock for the reader to settle some
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.full_timeout
            elif now >= deadline:
                raise InboxFull(
                    f"inbox of {dst} holds {unread} unsettled messages ([bus] inbox_depth = {depth}) and its "
                    f"reader settled none in {self.full_timeout:g}s; {len(records)} message(s) were not sent. "
                    "The reader is stuck or too slow: raise [bus] inbox_depth (0: unlimited) or send less"
                )
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 0.05)
        self.ring(dst)

    def _append_locked(self, fd: int, dst: str, data: bytes, count: int, counts, n: int) -> None:
        """The append itself, under the inbox's flock: all of ``data`` or nothing."""
        size = os.fstat(fd).st_size
        torn = 0
        writing = False
        try:
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a sender died in the middle of a write: remove the torn write whole (a batch
                # is visible all or nothing) and leave one malformed record in its place
                size = _end_of_last_write(fd, size)
                os.ftruncate(fd, size)
                os.write(fd, TORN_RECORD)
                size += len(TORN_RECORD)
                torn = 1
            writing = True
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
            self.last_written = True
        except OSError as exc:
            os.ftruncate(fd, size)  # no half-written batch is ever visible
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise BusError(
                    f"bus {self.run_dir} is full ({exc.strerror}): {count} message(s) to {dst} "
                    "were not written; free space in the bus root or set [bus] root elsewhere"
                ) from None
            raise
        except BaseException:
            # A signal handler raised (Ctrl-C, the CLI's SIGTERM): Python runs it as a system
            # call returns, so it may be right after the write.  A whole write stays (a reader
            # may have read it already) and last_written says so; a partial one is removed.
            if writing and os.fstat(fd).st_size == size + len(data):
                self.last_written = True
                if counts is not None:
                    counts[0] += torn + n
            else:
                os.ftruncate(fd, size)
            raise
        if counts is not None:
            counts[0] += torn + n  # one aligned 8-byte store

    def ring(self, dst: str) -> None:
        """Wake ``dst`` if it sleeps.  Never blocks; a missing doorbell means it is not asleep yet.

        ``EAGAIN`` from a unix datagram ``sendto`` has two causes.  The receiver's
        queue is full: a wake-up is pending there, nothing to do.  Or *this*
        socket's send buffer is full: every datagram stays charged to its sender
        until its receiver reads it, so a coordinator ringing hundreds of busy
        agents runs out of buffer (~200 KB, a few hundred rings) and the ring is
        not delivered at all.  A lost ring is a lost wake-up (an agent sleeping
        on unread work until the watchdog kills it: seen with 500 agents x 2
        tasks), so on ``EAGAIN`` with this socket's buffer (mostly) used up the
        ring is retried once from a fresh socket, whose buffer is empty.  With
        room left, the receiver's queue is full, which is the common case (a
        busy receiver), and the ring is done.
        """
        addr = self._bell_addrs.get(dst) or self._bell_addr(dst)
        for fresh in (False, True):
            if self._ringer is None or fresh:
                if self._ringer is not None:
                    self._ringer.close()  # its queued rings stay with their receivers
                    self.rings_retried += 1
                self._ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._ringer.setblocking(False)
                self._ringer_sndbuf = self._ringer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            try:
                self._ringer.sendto(b"!", addr)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                return  # not bound (yet): the reader reads after it binds
            except BlockingIOError:
                if fresh or not _send_buffer_full(self._ringer, self._ringer_sndbuf):
                    return  # dst's queue is full: a wake-up is pending there
                # this socket's buffer is full: once more from a fresh socket

    def _bell_addr(self, dst: str) -> str:
        """The path of ``dst``'s doorbell, kept; BusError when ``dst`` is not a plain name."""
        addr = self._bell_addrs.get(dst)
        if addr is None:
            if not _plain_name(dst):
                raise BusError(f"destination {dst!r:.200} is not an inbox id (letters, digits, '_', '.', '-', up to 128)")
            if len(self._bell_addrs) >= _MAX_CACHED_ADDRS:
                self._bell_addrs.clear()
            addr = self._bell_addrs[dst] = self._bell_prefix + bell_name(dst)
        return addr

    # ------------------------------------------------------------------ receiving

    def _inbox(self, agent_id: str, location: str) -> _Inbox:
        inbox = self._inboxes.get(agent_id)
        if inbox is None:
            self._check_location(location)
            if not _plain_name(agent_id):
                raise BusError(f"inbox id {agent_id!r:.200} is not a plain name")
            fd = self._open_in_run(location, os.O_RDONLY | os.O_CREAT)
            try:
                cursor_fd = self._open_in_run(f"cursor/{agent_id}", os.O_RDWR | os.O_CREAT)
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
                    settled += _record_count(os.pread(fd, min(_READ_CHUNK, pos - off), off))
                inbox.counts = self._count_map(location)
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
                    raise BusError(
                        f"bus {self.run_dir} is full ({exc.strerror}): cannot record what {agent_id} has settled; "
                        "free space in the bus root or set [bus] root elsewhere"
                    ) from None
                raise
            if inbox.counts is not None:
                inbox.acked_count += moved
                inbox.counts[1] = inbox.acked_count  # senders waiting on a full inbox see room

    def unread_bytes(self, agent_id: str, location: str) -> int:
        """Bytes in the inbox past the settled cursor (what a replacement would re-read)."""
        try:
            size = os.stat(self._path(location)).st_size
        except FileNotFoundError:
            return 0
        try:
            raw = (self.run_dir / "cursor" / agent_id).read_bytes()
        except FileNotFoundError:
            raw = b""
        return size - (int.from_bytes(raw, "little") if len(raw) == 8 else 0)

    def _bell(self, agent_id: str) -> socket.socket:
        sock = self._bells.get(agent_id)
        if sock is None:
            path = os.fspath(self.run_dir / "bell" / bell_name(agent_id))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                os.unlink(path)  # a dead predecessor's doorbell
            except FileNotFoundError:
                pass
            sock.bind(path)
            # blocking: :meth:`wait` sleeps in recv itself; drains pass MSG_DONTWAIT
            self._bells[agent_id] = sock
        return sock

    def listen(self, agent_id: str) -> None:
        """Bind ``agent_id``'s doorbell.  Call before the first read so no wake-up is lost."""
        self._bell(agent_id)

    def wake_fd(self, agent_id: str) -> int:
        return self._bell(agent_id).fileno()

    def drain_wakeups(self, agent_id: str) -> None:
        """Discard pending doorbell bytes (call before reading, after a wake-up)."""
        recv = self._bell(agent_id).recv
        try:
            while True:
                recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        """Sleep until ``agent_id``'s doorbell rings (or ``timeout`` passes); True if it rang.

        Every record appended after the previous wake-up rang the doorbell after it
        was appended, so a reader that reads after ``wait`` returns never sleeps on
        unread records.
        """
        sock = self._bell(agent_id)
        if timeout is None:
            # blocks: one system call to sleep and wake.  Further rings stay queued and
            # make a later wait return at once: a spurious wake-up costs one empty read,
            # less than draining after every wake-up.
            sock.recv(64)
            return True
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            return False
        self.drain_wakeups(agent_id)
        return True

    # ------------------------------------------------------------------ dead letters and state

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        fd = self._dead_fds.get(agent_id)
        if fd is None:
            if not _plain_name(agent_id):
                raise BusError(f"inbox id {agent_id!r:.200} is not a plain name")
            fd = self._open_in_run(f"dead/{agent_id}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._dead_fds[agent_id] = fd
        line = json.dumps({"reason": reason, "raw_b64": base64.b64encode(record[:65536]).decode()}) + "\n"
        os.write(fd, line.encode())

    def dead_letter_count(self) -> int:
        count = 0
        for path in (self.run_dir / "dead").glob("*.jsonl"):
            with open(path, "rb") as f:
                count += sum(1 for _ in f)
        return count

    def dead_letters(self) -> list[dict]:
        """Every dead-lettered record of the run: ``{"agent", "reason", "raw_b64"}``."""
        out = []
        for path in sorted((self.run_dir / "dead").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                out.append({"agent": path.stem, **json.loads(line)})
        return out

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise BusError(
                    f"bus {self.run_dir} is full ({exc.strerror}): cannot write {path.name}; "
                    "free space in the bus root or set [bus] root elsewhere"
                ) from None
            raise

    def free_bytes(self) -> int | None:
        """Bytes still free on the file system of the run directory (None if unknown)."""
        try:
            st = os.statvfs(self.run_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def put_state(self, key: str, data: bytes) -> None:
        check_agent_id(key)
        self._write_atomic(self.run_dir / "state" / key, data)

    def get_state(self, key: str) -> bytes | None:
        check_agent_id(key)
        try:
            fd = self._open_in_run(f"state/{key}", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            with open(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- helpers used by `cfn clean`


def check_private_dir(run_dir: str) -> None:
    """Refuse a run directory that is a symlink, not ours, or readable by others."""
    try:
        st = os.lstat(run_dir)
    except FileNotFoundError:
        raise BusError(f"run directory {run_dir} does not exist (its coordinator has ended)") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BusError(f"run directory {run_dir} is not a plain directory (a symlink or file was planted there)")
    if st.st_uid != os.getuid():
        raise BusError(f"run directory {run_dir} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise BusError(f"run directory {run_dir} has mode {stat.S_IMODE(st.st_mode):o}; cfn requires 0700")


def run_is_stale(run_dir: str | os.PathLike) -> bool:
    """True when the coordinator that made ``run_dir`` is no longer running."""
    try:
        owner = json.loads((Path(run_dir) / "owner.json").read_text())
        pid, start = int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        # no readable owner file: stale only if old enough not to be a run being created
        try:
            return time.time() - os.lstat(run_dir).st_mtime > 60
        except OSError:
            return False
    current = _proc_start_time(pid)
    return current is None or (start is not None and current != start)


def find_runs(root: str | None = None) -> list[tuple[Path, bool]]:
    """Our run directories under ``root`` with whether each is stale."""
    root = root or default_root()
    out = []
    try:
        entries = sorted(Path(root).glob("cfn-*"))
    except OSError:
        return out
    for path in entries:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        out.append((path, run_is_stale(path)))
    return out


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a run directory, including doorbell sockets; never follows symlinks."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _send_buffer_full(sock: socket.socket, size: int) -> bool:
    """Is more than half of ``sock``'s send buffer (``size`` bytes) held by datagrams not yet read?"""
    try:  # SIOCOUTQ (same number as TIOCOUTQ): bytes a unix socket has sent and nobody read yet
        queued = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return True  # cannot tell: a fresh socket costs little
    return queued * 2 > size


def _libc_mmap(fd: int) -> int:
    """Map the first 16 bytes of ``fd`` shared, read-write; the mapping outlives the fd."""
    addr = _LIBC.mmap(None, 16, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
