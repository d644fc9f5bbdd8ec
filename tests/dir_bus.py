"""A second transport, written only against :class:`cfn_core.bus.Bus`: one file per message batch.

It exists to prove the transport interface is real: nothing here imports the
shm bus or knows how it works; tests/test_bus_acceptance.py runs the same
acceptance tests on it as on the shm bus, including whole coordinations in
which agents are separate processes.  Installed as the plugin ``dirbus``
(``tests/test_bus_acceptance.py`` makes the entry point).

Layout of one run (a private directory, mode 0700, under ``[bus] root``)::

    q/<location>/<stamp>      one file per ``deliver``: its records back to back.  Written
                              to a dot-file and renamed in, so it appears whole or not at
                              all; ``stamp`` = monotonic ns, pid, a counter: one sender's
                              files sort in the order it delivered them
    bell/<inbox id>           the reader's wake-up FIFO (one byte per delivery)
    dead/<inbox id>.jsonl     dead letters
    state/<key>               put_state (``state/config`` is what agents bootstrap from)

A read returns the files not yet returned to this process, in name order; an
ack of every record of a file removes it (a partial ack rewrites the file with
the records left), so a replacement reader gets exactly what was not settled.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import re
import select
import shutil
import tempfile
import threading
import time

from cfn_core import BusError, check_agent_id, hookimpl

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def _plain(name: str) -> bool:
    return type(name) is str and _NAME.match(name) is not None and ".." not in name


class DirBus:
    """See the module docstring; every method's contract is :class:`cfn_core.bus.Bus`'s."""

    name = "dir"
    split_inboxes = True  # a record lands in the directory of the location its sender gives

    def __init__(self, run_dir: str):
        self.run_ref = os.path.abspath(run_dir)
        self.run_id = os.path.basename(self.run_ref)
        self.last_written = False
        self.lock_wait = None  # no locks, nothing to measure
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()  # deliver may run in a second thread (a batch flusher)
        self._made: set[str] = set()  # inbox directories known to exist
        self._seen: dict[str, set[str]] = {}  # inbox id -> files returned to this process
        self._held: dict[str, dict[str, list]] = {}  # inbox id -> file -> [record or None once acked]
        self._where: dict[str, str] = {}  # inbox id -> its directory
        self._bells: dict[str, int] = {}  # inbox id -> read end of its FIFO (opened read-write)

    # ------------------------------------------------------------------ opening (the plugin's cfn_bus)

    @classmethod
    def create(cls, root: str | None) -> "DirBus":
        root = os.path.abspath(root or tempfile.gettempdir())
        try:
            run_dir = tempfile.mkdtemp(prefix="cfn-dir-", dir=root)
            for sub in ("q", "bell", "dead", "state"):
                os.mkdir(os.path.join(run_dir, sub), 0o700)
        except OSError as exc:
            raise BusError(f"dir bus: cannot create a run under {root!r}: {exc.strerror}") from None
        return cls(run_dir)

    @classmethod
    def attach(cls, run_ref: str) -> "DirBus":
        if not os.path.isdir(os.path.join(run_ref, "q")):
            raise BusError(f"dir bus: {run_ref} is not a run directory (its coordinator has ended)")
        return cls(run_ref)

    # ------------------------------------------------------------------ names

    def _inbox_dir(self, location: str) -> str:
        parts = location.split("/") if type(location) is str else [None]
        if not all(_plain(p) for p in parts):
            raise BusError(f"dir bus: location {location!r:.200} is not plain names joined by '/'")
        return os.path.join(self.run_ref, "q", *parts)

    @staticmethod
    def _check_id(agent_id: str) -> None:
        if not _plain(agent_id):
            raise BusError(f"dir bus: inbox id {agent_id!r:.200} is not a plain name")

    # ------------------------------------------------------------------ sending

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        self.last_written = False
        self._check_id(dst)
        where = self._inbox_dir(location)
        if where not in self._made:
            os.makedirs(where, 0o700, exist_ok=True)
            self._made.add(where)
        with self._seq_lock:
            stamp = f"{time.monotonic_ns():020d}-{os.getpid():08d}-{next(self._seq):012d}"
        tmp = os.path.join(where, "." + stamp)
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(records))
            os.rename(tmp, os.path.join(where, stamp))  # the batch appears whole
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise BusError(f"dir bus: cannot write to {where}: {exc.strerror}") from None
        self.last_written = True
        self._ring(dst)

    def _ring(self, dst: str) -> None:
        try:
            fd = os.open(os.path.join(self.run_ref, "bell", dst), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no FIFO or nobody has it open: the reader is not listening yet, it reads first
        try:
            os.write(fd, b"!")
        except OSError:
            pass  # full: a wake-up is pending already
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ receiving

    def listen(self, agent_id: str) -> None:
        self._bell(agent_id)

    def _bell(self, agent_id: str) -> int:
        fd = self._bells.get(agent_id)
        if fd is None:
            self._check_id(agent_id)
            path = os.path.join(self.run_ref, "bell", agent_id)
            try:
                os.mkfifo(path, 0o600)  # kept across incarnations: a sender may be writing to it
            except FileExistsError:
                pass
            # read-write: the FIFO never reads as end-of-file (always readable) when no sender has it open
            fd = self._bells[agent_id] = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return fd

    def read(self, agent_id: str, location: str) -> list[tuple[bytes, object]]:
        self._check_id(agent_id)
        where = self._where.setdefault(agent_id, self._inbox_dir(location))
        seen = self._seen.setdefault(agent_id, set())
        held = self._held.setdefault(agent_id, {})
        try:
            names = sorted(n for n in os.listdir(where) if not n.startswith(".") and n not in seen)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                with open(os.path.join(where, name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            seen.add(name)
            records = data.splitlines(keepends=True)
            held[name] = list(records)
            out += [(record, f"{name}#{i}") for i, record in enumerate(records)]
        return out

    def ack(self, agent_id: str, receipts) -> None:
        held = self._held.get(agent_id, {})
        touched = set()
        others: dict[str, list] = {}
        for receipt in receipts:
            if type(receipt) is tuple:  # (inbox id, receipt): read from another inbox on our behalf
                others.setdefault(receipt[0], []).append(receipt[1])
                continue
            name, _, index = str(receipt).partition("#")
            records = held.get(name)
            if records is None or not index.isdigit() or int(index) >= len(records):
                continue
            records[int(index)] = None
            touched.add(name)
        for other, rs in others.items():
            self.ack(other, rs)
        where = self._where.get(agent_id)
        for name in touched:
            left = [r for r in held[name] if r is not None]
            path = os.path.join(where, name)
            if not left:
                os.unlink(path)
                del held[name]
            else:  # the records still unsettled, replaced atomically (a replacement reads these)
                with open(os.path.join(where, "." + name), "wb") as f:
                    f.write(b"".join(left))
                os.replace(os.path.join(where, "." + name), path)

    def unread_bytes(self, agent_id: str, location: str) -> int:
        where = self._inbox_dir(location)
        try:
            return sum(os.path.getsize(os.path.join(where, n)) for n in os.listdir(where) if not n.startswith("."))
        except FileNotFoundError:
            return 0

    def wake_fd(self, agent_id: str) -> int:
        return self._bell(agent_id)

    def drain_wakeups(self, agent_id: str) -> None:
        fd = self._bell(agent_id)
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        ready, _, _ = select.select([self._bell(agent_id)], [], [], timeout)
        if ready:
            self.drain_wakeups(agent_id)
        return bool(ready)

    # ------------------------------------------------------------------ dead letters and state

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        self._check_id(agent_id)
        line = json.dumps({"reason": reason, "raw_b64": base64.b64encode(record[:65536]).decode()}) + "\n"
        fd = os.open(os.path.join(self.run_ref, "dead", agent_id + ".jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def dead_letters(self) -> list[dict]:
        out = []
        dead = os.path.join(self.run_ref, "dead")
        for name in sorted(os.listdir(dead)):
            with open(os.path.join(dead, name)) as f:
                out += [{"agent": name[: -len(".jsonl")], **json.loads(line)} for line in f]
        return out

    def dead_letter_count(self) -> int:
        return len(self.dead_letters())

    def put_state(self, key: str, data: bytes) -> None:
        check_agent_id(key)
        path = os.path.join(self.run_ref, "state", key)
        tmp = os.path.join(self.run_ref, "state", f".{key}.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get_state(self, key: str) -> bytes | None:
        check_agent_id(key)
        try:
            with open(os.path.join(self.run_ref, "state", key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    get_local_state = get_state  # its state is the local run directory

    def free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.run_ref)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        for fd in self._bells.values():
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        self._bells = {}

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.run_ref, ignore_errors=True)


@hookimpl
def cfn_bus(config, run_ref):
    if run_ref is None:
        return DirBus.create(config.bus.root or None)
    return DirBus.attach(run_ref)
