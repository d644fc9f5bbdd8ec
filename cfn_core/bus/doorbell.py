"""The shm bus's wake-ups: one unix datagram socket per reader (``bell/<id>``), rung by senders.

After appending, a sender sends one datagram (the receiver's id) to the receiver's doorbell
(non-blocking; a full queue means a wake-up is already pending).  The
receiver binds its doorbell *before* its first read, so no wake-up can be
lost, and sleeps in ``recv`` on it without polling.  Every record appended
after a wake-up rings again, so a reader reads once per wake-up and goes back
to sleep: it never needs to read again "in case".
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import sys
import termios

from ..errors import BusError
from .rundir import plain_name

#: doorbell paths a sender keeps (a string each; cleared when full)
_MAX_CACHED_ADDRS = 65536
#: receiver ids one datagram names at most (Ringer.ring_many); 128 ids of up to 128 bytes fit in 16 KiB
_IDS_PER_RING = 128
BELL_NAME_MAX = 32  # unix socket paths are limited to 107 bytes


def bell_name(agent_id: str) -> str:
    """The doorbell socket's file name: the id itself, or a hash of a long id."""
    if len(agent_id) <= BELL_NAME_MAX:
        return agent_id
    return "h" + hashlib.blake2b(agent_id.encode(), digest_size=15).hexdigest()


def _send_buffer_full(sock: socket.socket, size: int) -> bool:
    """Is more than half of ``sock``'s send buffer (``size`` bytes) held by datagrams not yet read?"""
    try:  # SIOCOUTQ (same number as TIOCOUTQ): bytes a unix socket has sent and nobody read yet
        queued = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return True  # cannot tell: a fresh socket costs little
    return queued * 2 > size


class Doorbells:
    """The doorbells this process listens on, by reader id."""

    def __init__(self, bell_dir: str):
        self.bell_dir = bell_dir
        self._bells: dict[str, socket.socket] = {}

    def bell(self, agent_id: str) -> socket.socket:
        """``agent_id``'s bound doorbell socket (bound on first use, replacing a dead predecessor's)."""
        sock = self._bells.get(agent_id)
        if sock is None:
            path = os.path.join(self.bell_dir, bell_name(agent_id))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                os.unlink(path)  # a dead predecessor's doorbell
            except FileNotFoundError:
                pass
            sock.bind(path)
            # blocking: :meth:`wait` sleeps in recv itself; drains pass MSG_DONTWAIT
            self._bells[agent_id] = sock
        return sock

    def drain(self, agent_id: str) -> None:
        """Discard pending doorbell bytes."""
        recv = self.bell(agent_id).recv
        try:
            while True:
                recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass

    def wait(self, agent_id: str, timeout: float | None) -> bool:
        """Sleep until the doorbell rings (or ``timeout`` passes); True if it rang."""
        sock = self.bell(agent_id)
        if timeout is None:
            # blocks: one system call to sleep and wake.  Further rings stay queued and
            # make a later wait return at once: a spurious wake-up costs one empty read,
            # less than draining after every wake-up.
            sock.recv(64)
            return True
        from ..process import wait_readable  # poll(2): the socket's number may be over 1024

        if not wait_readable([sock], timeout):
            return False
        self.drain(agent_id)
        return True

    def share(self, agent_id: str, bell_id: str) -> None:
        """Make rings to ``agent_id`` reach ``bell_id``'s doorbell (bound here) instead of a socket of its own.

        ``bell/<agent_id>`` becomes a symbolic link to ``bell_id``'s socket (replaced
        atomically, a dead predecessor's socket too): a sender's ``sendto`` follows it,
        and the ring's datagram names ``agent_id`` (see :meth:`Ringer.ring`).  One
        socket and one descriptor per listening process, however many inboxes it serves.
        """
        self.bell(bell_id)
        path = os.path.join(self.bell_dir, bell_name(agent_id))
        tmp = f"{path}.{os.getpid()}.lnk"
        target = bell_name(bell_id)  # relative: a replacement's socket at the same name is found
        try:
            os.symlink(target, tmp)
        except FileExistsError:  # left by a process of this pid that died here (pids are reused)
            os.unlink(tmp)
            os.symlink(target, tmp)
        os.replace(tmp, path)

    def woken(self, bell_id: str) -> list[str] | None:
        """The inbox ids whose rings reached ``bell_id``'s doorbell since the last call; never blocks.

        None when rings may have been dropped (the queue was full, so some senders
        found a wake-up pending and rang no more): the caller then reads every inbox
        it serves.  A drain that took at least the queue's capacity in datagrams is
        the sign (``net.unix.max_dgram_qlen``): a ring is only dropped at a full queue,
        and this drain read everything that queue held.
        """
        recv = self.bell(bell_id).recv
        ids: list[str] = []
        datagrams = 0
        try:
            while True:
                # a datagram names one receiver, or several separated by newlines (Ringer.ring_many)
                ids.extend(recv(65536, socket.MSG_DONTWAIT).decode("utf-8", "replace").split("\n"))
                datagrams += 1
        except BlockingIOError:
            pass
        if datagrams >= _dgram_qlen():
            return None
        return ids

    def close(self) -> None:
        for sock in self._bells.values():
            sock.close()
        self._bells = {}


_QLEN: list[int] = []


def _dgram_qlen() -> int:
    """The kernel's queue length of a unix datagram socket (``net.unix.max_dgram_qlen``)."""
    if not _QLEN:
        try:
            with open("/proc/sys/net/unix/max_dgram_qlen") as f:
                _QLEN.append(max(1, int(f.read())))
        except (OSError, ValueError):
            _QLEN.append(1)  # cannot tell: every drain counts as one that may have dropped rings
    return _QLEN[0]


class Ringer:
    """Rings other readers' doorbells from one non-blocking socket."""

    def __init__(self, bell_dir: str):
        self._prefix = os.path.join(bell_dir, "")
        self._sock: socket.socket | None = None
        self._sndbuf = 0
        self.addrs: dict[str, str] = {}  # receiver id -> its doorbell's path (built once)
        self._names: dict[str, bytes] = {}  # receiver id -> the ring's datagram (its id: a shared doorbell tells whom)
        self._targets: dict[str, str] = {}  # receiver id -> the socket its doorbell is (a shared one: see ring_many)
        #: rings retried from a fresh socket because the old one's send buffer was full (see ring)
        self.retried = 0

    def addr(self, dst: str) -> str:
        """The path of ``dst``'s doorbell, kept; BusError when ``dst`` is not a plain name."""
        addr = self.addrs.get(dst)
        if addr is None:
            if not plain_name(dst):
                raise BusError(f"destination {dst!r:.200} is not an inbox id (letters, digits, '_', '.', '-', up to 128)")
            if len(self.addrs) >= _MAX_CACHED_ADDRS:
                self.addrs.clear()
                self._names.clear()
                self._targets.clear()
            self._names[dst] = dst.encode()
            self._targets.pop(dst, None)
            addr = self.addrs[dst] = self._prefix + bell_name(dst)
        return addr

    def target(self, dst: str) -> str:
        """The socket a ring to ``dst`` reaches: its own doorbell, or the one its link names.

        A shared doorbell (:meth:`Doorbells.share`) is a symbolic link to its listener's
        socket; which socket is kept once known (a link stays a link to the same name: a
        replacement listener binds that name again).  A doorbell not there yet is looked
        at again next time.
        """
        found = self._targets.get(dst)
        if found is None:
            addr = self.addrs.get(dst) or self.addr(dst)
            try:
                link = os.readlink(addr)
            except OSError as exc:  # EINVAL: a socket of its own; ENOENT: not listening yet
                if exc.errno == errno.ENOENT:
                    return addr
                found = addr
            else:
                found = link if link.startswith("/") else self._prefix + link
            self._targets[dst] = found
        return found

    def shared(self, dst: str) -> bool:
        """Is ``dst``'s doorbell a link to another reader's socket (:meth:`Doorbells.share`)?"""
        return self.target(dst) != (self.addrs.get(dst) or self.addr(dst))

    def ring_many(self, dsts: list[str]) -> None:
        """:meth:`ring` each of ``dsts``, one datagram per shared doorbell naming all its receivers.

        The coordinator rings 10,000 hosted agents of two hosts after sending them their
        tasks: one datagram each overflowed the hosts' sockets (a queue of
        ``net.unix.max_dgram_qlen`` datagrams, often 10) at once, and every overflow made a
        host read all its agents' inboxes.  Grouped, a slice of deliveries is one datagram
        per host (at most ``_IDS_PER_RING`` ids each).
        """
        if len(dsts) == 1:
            self.ring(dsts[0])
            return
        groups: dict[str, list[bytes]] = {}
        for dst in dsts:
            names = groups.setdefault(self.target(dst), [])
            names.append(self._names.get(dst) or dst.encode())
        for addr, names in groups.items():
            for i in range(0, len(names), _IDS_PER_RING):
                self._send(b"\n".join(names[i : i + _IDS_PER_RING]), addr)

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
        addr = self.addrs.get(dst) or self.addr(dst)
        self._send(self._names.get(dst) or dst.encode(), addr)

    def _send(self, name: bytes, addr: str) -> None:
        """One ring's datagram to the socket at ``addr`` (see :meth:`ring`)."""
        for fresh in (False, True):
            if self._sock is None or fresh:
                if self._sock is not None:
                    self._sock.close()  # its queued rings stay with their receivers
                    self.retried += 1
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
                self._sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            try:
                self._sock.sendto(name, addr)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                return  # not bound (yet): the reader reads after it binds
            except BlockingIOError:
                if fresh or not _send_buffer_full(self._sock, self._sndbuf):
                    return  # dst's queue is full: a wake-up is pending there
                # this socket's buffer is full: once more from a fresh socket

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
