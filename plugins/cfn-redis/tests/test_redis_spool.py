"""The relay writes to spool inboxes through the kernel's append: one torn-write policy for both."""

from __future__ import annotations

import os

from cfn_core import ShmBus
from cfn_core.bus.shm import TORN_RECORD

from cfn_redis.relay import append_local


def test_a_torn_write_in_a_spool_inbox_is_replaced_by_the_torn_marker_not_made_visible(bus_root):
    """A writer killed mid-batch leaves a tail without its newline: none of that batch may be read.

    The relay used to pad such a tail with a newline, which made the torn batch's
    first records visible (half a batch) and its cut-off last record a record of
    its own; the kernel's policy removes the torn write and leaves one marker.
    """
    bus = ShmBus.create(str(bus_root))
    try:
        bus.deliver("r1", "inbox/r1", [b'{"whole":1}\n'])
        fd = os.open(bus.run_dir / "inbox" / "r1", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'{"torn":1}\x1e{"torn":2}\x1e{"tor')  # a batch cut by its writer's death
        os.close(fd)
        journaled = []
        ends = append_local(bus, "r1", "inbox/r1", [b'{"a":1}\n{"a":2}\n', b'{"b":1}\n'], journaled.append)
        got = bus.read("r1", "inbox/r1")
        assert [raw for raw, _ in got] == [b'{"whole":1}\n', TORN_RECORD, b'{"a":1}\n', b'{"a":2}\n', b'{"b":1}\n']
        # the journal (written before the data) and the returned ends are the receipts of each entry's last record
        receipts = [r for _, r in got]
        assert journaled == [ends] and ends == [receipts[3], receipts[4]]
    finally:
        bus.destroy()
