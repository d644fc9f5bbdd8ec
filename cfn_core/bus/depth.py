"""The shm bus's backpressure counters: two uint64 per inbox, shared by every process through mmap.

With ``[bus] inbox_depth`` on, ``count/<location>`` holds the inbox's records
*appended* (written by senders under the inbox's flock) and *settled* (written
by its reader).  A sender holding the flock compares the two (no system call)
and, when ``depth`` records are unsettled, lets go of the lock and waits,
bounded by ``full_timeout``, before raising :class:`~cfn_core.errors.InboxFull`.
Because the check and the append happen under the same lock, the depth holds
under any number of concurrent senders.  A new reader incarnation recounts the
settled records from the file, so a crash between two counter writes cannot
shrink an inbox for good.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from ..errors import BusError, InboxFull

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
#: counters mapped per process at most.  Each mapping is one of the process's
#: vm.max_map_count areas (65,530 by default), which its heap needs too: a coordinator of
#: 100,000 hosted agents ran out of them at 65,240 inboxes (ENOMEM, then MemoryError
#: everywhere).  Beyond this, an inbox's counters are read and written through its file.
_MAX_MAPS = 16_384


def _libc_mmap(fd: int) -> int:
    """Map the first 16 bytes of ``fd`` shared, read-write; the mapping outlives the fd."""
    addr = _LIBC.mmap(None, 16, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


class _FileCounts:
    """``[appended, settled]`` of one inbox through its counter file, a system call each:
    for the inboxes beyond :data:`_MAX_MAPS`.  Not unmapped memory, so nothing can be used
    after it is gone; the same 8-byte values as the mapped counters, which other
    processes may have mapped."""

    __slots__ = ("run_dir", "name")

    def __init__(self, run_dir, name: str):
        self.run_dir, self.name = run_dir, name

    def __getitem__(self, index: int) -> int:
        fd = self.run_dir.open(self.name, os.O_RDONLY)
        try:
            raw = os.pread(fd, 8, 8 * index)
        finally:
            os.close(fd)
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def __setitem__(self, index: int, value: int) -> None:
        fd = self.run_dir.open(self.name, os.O_WRONLY)
        try:
            os.pwrite(fd, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"), 8 * index)
        finally:
            os.close(fd)


class InboxCounters:
    """The ``[appended, settled]`` counters of the inboxes this process touched.

    The first :data:`_MAX_MAPS` are mapped (no system call to read or write them) and
    stay mapped until :meth:`close`: a counter is never unmapped while another thread
    (a batch flusher) may hold it.  The others go through their files.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir  # a cfn_core.bus.rundir.RunDir
        self._maps: dict[str, tuple] = {}  # location -> (address or None, [appended, settled])
        self.mapped = 0

    def get(self, location: str):
        """``[appended, settled]`` record counts of an inbox, shared by every process of the run.

        Mapped with libc's mmap rather than :mod:`mmap`, which would keep one
        duplicate file descriptor per inbox open for the life of the mapping.
        """
        entry = self._maps.get(location)
        if entry is None:
            name = f"count/{location}"
            fd = self.run_dir.open(name, os.O_RDWR | os.O_CREAT)
            try:
                # allocate the page now: a store into a mapping of a full tmpfs would be a SIGBUS
                os.posix_fallocate(fd, 0, 16)
                if self.mapped >= _MAX_MAPS:
                    entry = self._maps[location] = (None, _FileCounts(self.run_dir, name))
                    return entry[1]
                addr = _libc_mmap(fd)
            except OSError as exc:
                raise BusError(f"bus {self.run_dir.path} cannot hold the counters of inbox {location}: {exc.strerror}") from None
            finally:
                os.close(fd)
            self.mapped += 1
            entry = self._maps[location] = (addr, (ctypes.c_uint64 * 2).from_address(addr))
        return entry[1]

    def close(self) -> None:
        """Unmap every counter (a counter obtained before must not be used after)."""
        maps = list(self._maps.values())
        self._maps = {}
        self.mapped = 0
        for addr, _ in maps:
            if addr is not None:
                _LIBC.munmap(addr, 16)


def inbox_full(dst: str, unread: int, depth: int, full_timeout: float, count: int) -> InboxFull:
    """The error a sender raises when ``dst``'s inbox stayed full for ``full_timeout`` seconds."""
    return InboxFull(
        f"inbox of {dst} holds {unread} unsettled messages ([bus] inbox_depth = {depth}) and its "
        f"reader settled none in {full_timeout:g}s; {count} message(s) were not sent. "
        "The reader is stuck or too slow: raise [bus] inbox_depth (0: unlimited) or send less"
    )
