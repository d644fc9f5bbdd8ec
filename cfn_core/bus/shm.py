"""The embedded transport: inbox files under /dev/shm, doorbell sockets for wake-ups.

:class:`ShmBus` implements :class:`cfn_core.bus.Bus` by composing one module
per mechanism:

=====================  ==============================================================
:mod:`.rundir`         the private run directory: safe opening, atomic files, ``cfn clean``
:mod:`.append`         the inbox format and the one locked append (torn-write policy)
:mod:`.depth`          backpressure: per-inbox counters shared through mmap
:mod:`.doorbell`       wake-ups: a unix datagram socket per reader
:mod:`.reader`         reading without racing appends, receipts, the settled cursor
=====================  ==============================================================

Layout of one run (``/dev/shm/cfn-<random>/``, mode 0700)::

    owner.json            coordinator pid and process start time (for `cfn clean`)
    state/config          the resolved configuration every agent loads (put_state("config"))
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

* A sender appends under ``flock`` with one ``write`` of whole records; a
  failed write is truncated back, a write torn by a sender's death is replaced
  by a marker record the reader dead-letters (:mod:`.append`).
* The reader never truncates or rewrites: it keeps an offset and only takes
  records up to the last ``\\n``, so it cannot race with appends (:mod:`.reader`).
* The cursor advances only over acked records, so a replacement of a dead agent
  re-reads what its predecessor had not settled.
* Every record appended after a reader's wake-up rings its doorbell again, and
  the reader binds its doorbell before its first read (:mod:`.doorbell`).

The coordinator's inboxes (ids starting with ``_``) are not limited by
``[bus] inbox_depth``: they are the fan-in of every result and the coordinator
drains them continuously.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from ..errors import BusError
from ..messages import check_agent_id
from .append import RECORD_SEP, TORN_RECORD, append_locked, join_records
from .depth import InboxCounters, inbox_full
from .doorbell import BELL_NAME_MAX, Doorbells, Ringer, bell_name
from .reader import InboxReader
from .rundir import (
    bus_full,
    RunDir,
    check_location,
    check_private_dir,
    close_fd,
    default_root,
    find_runs,
    plain_name,
    proc_start_time,
    remove_tree,
    run_is_stale,
    write_atomic,
    write_owner,
)

__all__ = [
    "RECORD_SEP",
    "TORN_RECORD",
    "ShmBus",
    "bell_name",
    "check_private_dir",
    "default_root",
    "find_runs",
    "remove_tree",
    "run_is_stale",
]

#: kept for callers of the single-module bus
_proc_start_time = proc_start_time

_MAX_CACHED_FDS = 512
#: deliveries of one deliver_many call rung together (a host is woken once per slice, not once per agent)
_RING_SLICE = 100


class ShmBus(InboxReader):
    """Inbox files under a private run directory.  See the module docstring and :class:`cfn_core.bus.Bus`."""

    name = "shm"
    split_inboxes = True  # every sender appends to the file at its location

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
        #: what an agent is started with to attach (``cfn_bus(config, run_ref)``): the run directory
        self.run_ref = os.fspath(self.run_dir)
        #: most unsettled records an agent's inbox may hold (0: unlimited); see the module docstring
        self.inbox_depth = inbox_depth
        #: seconds a sender waits for room in a full inbox before raising InboxFull
        self.full_timeout = full_timeout
        self.run_id = self.run_dir.name
        self.max_message_bytes = max_message_bytes
        self.owner = owner
        self.files = RunDir(self.run_dir)
        self.counters = InboxCounters(self.files)
        bell_dir = os.path.join(self.run_ref, "bell")
        self._bells = Doorbells(bell_dir)
        self._ringer = Ringer(bell_dir)
        self._append_fds: dict[str, int] = {}
        self._inboxes: dict = {}  # reader state by inbox id (cfn_core.bus.reader)
        #: whether the latest ``deliver`` wrote its records (whole).  Read after a deliver that
        #: raised: an interrupt (a signal handler that raises) can arrive after the write and
        #: before deliver returns, and a caller that keeps records until they are written
        #: (cfn-batch) must then not send them again.  A BusError always means not written.
        self.last_written = False
        self._dead_fds: dict[str, int] = {}
        #: the process that opened this bus (or last called :meth:`after_fork`): a forked
        #: child that inherited the object without calling after_fork is not it
        self.pid = os.getpid()
        #: set to a dict to measure lock contention: ``deliver`` then adds the time it waited
        #: for an inbox's flock held by another process, in nanoseconds, under the inbox's
        #: directory (the location up to its last ``/``)
        self.lock_wait: dict[str, int] | None = None

    @property
    def rings_retried(self) -> int:
        """Rings retried from a fresh socket because the old one's send buffer was full (see :meth:`ring`)."""
        return self._ringer.retried

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
        longest = len(os.path.join(run_dir, "bell", "x" * BELL_NAME_MAX))
        if longest > 107:
            os.rmdir(run_dir)
            raise BusError(
                f"bus root {root!r} is too long for doorbell sockets (paths up to 107 bytes); use a shorter [bus] root"
            )
        try:
            for sub in ("cursor", "bell", "dead", "state", "count"):
                os.mkdir(os.path.join(run_dir, sub), 0o700)
            bus = cls(run_dir, max_message_bytes=max_message_bytes, owner=True, inbox_depth=inbox_depth, full_timeout=full_timeout)
            write_owner(run_dir)
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
        self.pid = os.getpid()

    def close(self) -> None:
        """Close every descriptor this process holds for the run."""
        for fd in self._append_fds.values():
            close_fd(fd)
        for fd in self._dead_fds.values():
            close_fd(fd)
        self.files.close()
        for inbox in self._inboxes.values():
            close_fd(inbox.fd)
            close_fd(inbox.cursor_fd)
            inbox.counts = None
        self.counters.close()
        self._bells.close()
        self._ringer.close()
        self._append_fds, self._dead_fds, self._inboxes = {}, {}, {}

    def destroy(self) -> None:
        """Close and remove the run directory (coordinator only)."""
        self.close()
        remove_tree(self.run_dir)

    # ------------------------------------------------------------------ sending

    def _path(self, location: str) -> Path:
        check_location(location)
        return self.run_dir / location

    def _append_fd(self, location: str) -> int:
        fd = self._append_fds.get(location)
        if fd is None:
            check_location(location)
            fd = self.files.open(location, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            if len(self._append_fds) >= _MAX_CACHED_FDS:
                close_fd(self._append_fds.pop(next(iter(self._append_fds))))
            self._append_fds[location] = fd
        return fd

    def _count_map(self, location: str):
        """``[appended, settled]`` record counts of an inbox (see :mod:`.depth`)."""
        return self.counters.get(location)

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        """Append all ``records`` under one lock, atomically, then ring ``dst``'s doorbell.

        With ``inbox_depth`` set, waits (up to ``full_timeout``) while the inbox
        holds that many unsettled records, then raises :class:`InboxFull`.
        """
        self.append(dst, location, records)
        self._ringer.ring(dst)  # not self.ring: one call less on the hot path (ring is not overridden)

    def deliver_many(self, batches: Iterable[tuple[str, str, list[bytes]]]) -> None:
        """:meth:`deliver` each ``(dst, location, records)``, ringing them a slice at a time.

        The rings to shared doorbells (hosted agents) of a slice go out together after its
        appends, one datagram per doorbell (:meth:`~cfn_core.bus.doorbell.Ringer.ring_many`);
        a reader with a doorbell of its own is rung after its append, as by :meth:`deliver`
        (deferring those rings made a warm round of 500 process agents 5% slower: they
        started later, the other core idle meanwhile).  What was appended is rung even when
        a later delivery raises.  A :meth:`deliver` replaced by a subclass
        (another transport on this spool) or on the object (a test's fault) is called for each.
        """
        if getattr(self.deliver, "__func__", None) is not ShmBus.deliver:
            for dst, location, records in batches:
                self.deliver(dst, location, records)
            return
        ringer = self._ringer
        appended: list[str] = []

        def ring_appended() -> None:
            if appended:
                ringer.ring_many(appended)
                appended.clear()

        try:
            for dst, location, records in batches:
                # an inbox full of this slice's records, not rung yet, would never be read: ring first
                self.append(dst, location, records, on_full=ring_appended)
                if not ringer.shared(dst):
                    ringer.ring(dst)  # a doorbell of its own: nothing to group, and the reader starts now
                    continue
                appended.append(dst)
                if len(appended) == _RING_SLICE:
                    ring_appended()
        finally:
            ring_appended()

    def append(self, dst: str, location: str, records: list[bytes], *, before_write=None, on_full=None) -> int:
        """:meth:`deliver` without the wake-up: the records are in ``dst``'s inbox when it returns.

        Returns the offset at which the first record starts; each record's
        receipt (what :meth:`read` will return with it) is that offset plus the
        lengths of the records up to and including it.  ``before_write(start)``
        is called under the inbox's lock with that offset, before the data is
        written (cfn-redis's relay journals where its entries will be).  The
        append keeps the one torn-write policy of :mod:`cfn_core.bus.append`.  ``on_full()``
        is called (without the lock) before the first wait for room in a full inbox.
        """
        self.last_written = False
        if dst not in self._ringer.addrs:
            self._ringer.addr(dst)  # checks dst (defence in depth: a destination may come from a message)
        data = join_records(records)
        fd = self._append_fd(location)
        depth = self.inbox_depth
        counts = self.counters.get(location) if depth and not dst.startswith("_") else None
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
                    try:
                        return append_locked(fd, data, self, counts, n, before_write)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                            raise bus_full(self.run_dir, exc, f"{len(records)} message(s) to {dst} were not written") from None
                        raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            # full: wait without the lock for the reader to settle some
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.full_timeout
                if on_full is not None:
                    on_full()
            elif now >= deadline:
                raise inbox_full(dst, unread, depth, self.full_timeout, len(records))
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 0.05)

    def ring(self, dst: str) -> None:
        """Wake ``dst`` if it sleeps; never blocks (see :meth:`cfn_core.bus.doorbell.Ringer.ring`)."""
        self._ringer.ring(dst)

    # ------------------------------------------------------------------ receiving (reading and acks: .reader)

    def unread_bytes(self, agent_id: str, location: str) -> int:
        """Bytes in the inbox past the settled cursor (what a replacement would re-read)."""
        return self.inbox_size(location) - self.settled_offset(agent_id)

    def inbox_size(self, location: str) -> int:
        """Bytes in the inbox file at ``location`` (0 if it does not exist yet)."""
        try:
            return os.stat(self._path(location)).st_size
        except FileNotFoundError:
            return 0

    def settled_offset(self, agent_id: str) -> int:
        """The offset up to which ``agent_id``'s reader (any incarnation) has settled every record."""
        if not plain_name(agent_id):
            raise BusError(f"inbox id {agent_id!r:.200} is not a plain name")
        try:
            raw = (self.run_dir / "cursor" / agent_id).read_bytes()
        except FileNotFoundError:
            raw = b""
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def listen(self, agent_id: str) -> None:
        """Bind ``agent_id``'s doorbell.  Call before the first read so no wake-up is lost."""
        self._bells.bell(agent_id)

    def wake_fd(self, agent_id: str) -> int:
        return self._bells.bell(agent_id).fileno()

    # ------------------------------------------------------------------ shared doorbells (cfn_core.bus.SharedWakeups)

    def listen_shared(self, agent_id: str, bell_id: str) -> None:
        """Wake-ups of inbox ``agent_id`` reach ``bell_id``'s doorbell, naming ``agent_id`` (see :class:`SharedWakeups`)."""
        if not plain_name(agent_id) or not plain_name(bell_id):
            raise BusError(f"inbox ids {agent_id!r:.100} / {bell_id!r:.100} are not plain names")
        self._bells.share(agent_id, bell_id)

    def woken(self, bell_id: str) -> list[str] | None:
        """Inbox ids rung on ``bell_id``'s doorbell since the last call, or None: read them all."""
        return self._bells.woken(bell_id)

    def forget(self, agent_id: str, *, idle: bool = False) -> None:
        """Drop this process's reader state of inbox ``agent_id`` (and close its descriptors).

        The next :meth:`read` starts again at the settled cursor: what was read and
        not acked is returned again, as to a replacement process.  With ``idle``,
        only when nothing read is unsettled (a reader giving back its descriptors).
        """
        inbox = self._inboxes.get(agent_id)
        if inbox is None or (idle and (inbox.pending or inbox.acked_to != inbox.pos)):
            return
        del self._inboxes[agent_id]
        close_fd(inbox.fd)
        close_fd(inbox.cursor_fd)

    def drain_wakeups(self, agent_id: str) -> None:
        """Discard pending doorbell bytes (call before reading, after a wake-up)."""
        self._bells.drain(agent_id)

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        """Sleep until ``agent_id``'s doorbell rings (or ``timeout`` passes); True if it rang.

        Every record appended after the previous wake-up rang the doorbell after it
        was appended, so a reader that reads after ``wait`` returns never sleeps on
        unread records.
        """
        return self._bells.wait(agent_id, timeout)

    # ------------------------------------------------------------------ dead letters and state

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        fd = self._dead_fds.get(agent_id)
        if fd is None:
            if not plain_name(agent_id):
                raise BusError(f"inbox id {agent_id!r:.200} is not a plain name")
            fd = self.files.open(f"dead/{agent_id}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
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

    def write_file(self, rel: str, data: bytes) -> None:
        """Replace the file ``run_dir/rel`` with ``data`` atomically (``rel``: plain names joined by ``/``).

        For a transport built on this bus (cfn-redis keeps its relay's files in the spool).
        """
        check_location(rel)
        write_atomic(self.run_dir / rel, data, self.run_dir)

    def free_bytes(self) -> int | None:
        """Bytes still free on the file system of the run directory (None if unknown)."""
        try:
            st = os.statvfs(self.run_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def put_state(self, key: str, data: bytes) -> None:
        check_agent_id(key)
        write_atomic(self.run_dir / "state" / key, data, self.run_dir)

    def get_state(self, key: str) -> bytes | None:
        check_agent_id(key)
        try:
            fd = self.files.open(f"state/{key}", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            with open(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            os.close(fd)

    #: this bus's state is the run directory (a subclass whose get_state reads elsewhere keeps this)
    get_local_state = get_state
