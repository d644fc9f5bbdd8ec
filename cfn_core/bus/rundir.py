"""The shm bus's run directory: names, safe opening, atomic files, and the helpers of ``cfn clean``.

A run directory (``/dev/shm/cfn-<random>/``, mode 0700) is private to one
coordination.  Nothing in it is trusted: every file is opened without
following a symlink at any component (:class:`RunDir`), names are checked to
be plain (:func:`plain_name`, :func:`check_location`) and small files are
replaced atomically (:func:`write_atomic`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from ..errors import BusError

#: what an inbox id, a destination and each part of a location may be: an agent id
#: (cfn_core.messages.check_agent_id), a kernel inbox (``_coordinator``, ``_relay``), a
#: reader's secondary inbox (``agent-0001.fb``) or a directory (``inbox``, ``shard-3``)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def plain_name(name: str) -> bool:
    """Can ``name`` be one file name in the run directory (no path, no ``..``, not too long)?"""
    return type(name) is str and _NAME_RE.match(name) is not None and ".." not in name


def check_location(location: str) -> None:
    """Refuse a location that is not plain names joined by ``/`` (BusError)."""
    parts = location.split("/")
    if location.startswith("/") or ".." in parts:
        raise BusError(f"inbox location {location!r} escapes the run directory")
    if not all(plain_name(part) for part in parts):
        raise BusError(
            f"inbox location {location!r:.200} is not plain names joined by '/' "
            "(letters, digits, '_', '.', '-', up to 128 each)"
        )


def bus_full(run_dir, exc: OSError, what: str) -> BusError:
    """The one-line error for a write the full bus refused: ``what`` says which write."""
    return BusError(f"bus {run_dir} is full ({exc.strerror}): {what}; free space in the bus root or set [bus] root elsewhere")


def default_root() -> str:
    """/dev/shm when it is a writable directory, else the system temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def proc_start_time(pid: int) -> str | None:
    """The process start time from /proc (clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # field 22, counted after the parenthesised command name
    return data.rsplit(b")", 1)[1].split()[19].decode()


def write_owner(run_dir: str | os.PathLike) -> None:
    """Record this process as the run's coordinator (``owner.json``, read by :func:`run_is_stale`)."""
    me = os.getpid()
    write_atomic(
        Path(run_dir) / "owner.json",
        json.dumps({"pid": me, "start": proc_start_time(me), "created": time.time()}).encode(),
        Path(run_dir),
    )


def write_atomic(path: Path, data: bytes, run_dir: Path) -> None:
    """Replace ``path`` with ``data`` atomically (a temporary file, then ``rename``).

    A reader sees the old content or the new, never a part.  A full file system
    raises :class:`BusError` naming ``run_dir``; nothing is left behind.
    """
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
            raise bus_full(run_dir, exc, f"cannot write {path.name}") from None
        raise


def close_fd(fd: int) -> None:
    """Close ``fd``, ignoring an error (it may already be gone)."""
    try:
        os.close(fd)
    except OSError:
        pass


class RunDir:
    """Opens files of one run directory, keeping a descriptor of each directory it walked."""

    def __init__(self, path: Path):
        self.path = path
        self._dir_fds: dict[tuple, int] = {}  # ("inbox",) -> descriptor of run_dir/inbox, () -> run_dir

    def close(self) -> None:
        for fd in self._dir_fds.values():
            close_fd(fd)
        self._dir_fds = {}

    def open(self, rel: str, flags: int) -> int:
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
                    f"refusing {self.path / rel}: a symlink or non-directory was planted in the run directory"
                ) from None
            if exc.errno == errno.ENOENT and flags & os.O_CREAT:  # a kept directory was removed
                for kept in [d for d in self._dir_fds if d[: len(dirs)] == tuple(dirs)]:
                    close_fd(self._dir_fds.pop(kept))  # opened afresh next time (it may be made again)
                if not os.path.isdir(self.path):
                    raise BusError(f"run directory {self.path} does not exist (its coordinator has ended)") from None
                raise BusError(f"cannot create {self.path / rel}: its directory was removed") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BusError(f"refusing {self.path / rel}: not a regular file (something was planted there)")
        return fd

    def _dir_fd(self, dirs: tuple, create: int) -> int:
        """A kept descriptor of ``run_dir/dirs...`` opened without following symlinks (made if ``create``)."""
        fd = self._dir_fds.get(dirs)
        if fd is not None:
            return fd
        dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        if not dirs:
            try:
                fd = os.open(self.path, dir_flags)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BusError(f"run directory {self.path} is not a plain directory (a symlink was planted there)") from None
                if exc.errno == errno.ENOENT:
                    raise BusError(f"run directory {self.path} does not exist (its coordinator has ended)") from None
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
                        f"refusing {self.path.joinpath(*dirs)}: a symlink or non-directory was planted in the run directory"
                    ) from None
                raise
        self._dir_fds[dirs] = fd
        return fd


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
    current = proc_start_time(pid)
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
