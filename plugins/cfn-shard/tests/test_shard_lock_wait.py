"""The bus measures flock waits per directory, and only real waits."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from cfn_core.bus.shm import ShmBus
from cfn_core.messages import MessageFactory


def _blocked_waiters(inode: int) -> int:
    """Lock requests blocked on ``inode`` right now (``->`` lines of /proc/locks)."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and f":{inode} " in line)


def test_wait_for_a_held_inbox_lock_is_counted_under_its_shard(bus_root):
    bus = ShmBus.create(str(bus_root))
    try:
        bus.lock_wait = {}
        record = MessageFactory("s").make("a", "peer").encode()
        bus.deliver("a", "shard-1/a", [record])
        assert bus.lock_wait == {}  # uncontended: nothing counted
        holder = os.open(bus.run_dir / "shard-1" / "a", os.O_RDWR)  # another open file description
        inode = os.fstat(holder).st_ino
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)
            sender = threading.Thread(target=bus.deliver, args=("a", "shard-1/a", [record]))
            sender.start()
            deadline = time.monotonic() + 60
            while not _blocked_waiters(inode) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _blocked_waiters(inode) == 1  # the sender really waits for our lock
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)
        sender.join(60)
        assert set(bus.lock_wait) == {"shard-1"} and bus.lock_wait["shard-1"] > 0
        assert len(bus.read("a", "shard-1/a")) == 2
    finally:
        bus.destroy()
