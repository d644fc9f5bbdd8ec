"""A sender SIGKILLed in the middle of a flush never leaves part of a batch visible,
and a coordination whose agent is killed still accounts for every task and message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cfn_core import Coordinator
from cfn_core.messages import MalformedMessage, decode

SENDER = r"""
import sys
from cfn_core.bus.shm import ShmBus
from cfn_core.messages import MessageFactory
from cfn_batch import BatchSettings, Batcher
from cfn_batch.stats import BatchStats
bus = ShmBus.attach(sys.argv[1])
b = Batcher(bus, lambda d: "inbox/" + d, BatchSettings(size=400, max_size=400, adaptive=False, timeout_ms=600000), 1 << 20, BatchStats({}, 400))
f = MessageFactory("killed")
pad = "x" * 2000
n = 0
while True:
    n += 1
    b.send([f.make("a", "peer", body={"batch": n, "of": 400, "pad": pad}) for _ in range(400)])  # a size flush: one 1 MB write
"""


def test_sigkill_mid_flush_leaves_no_partial_batch(bus_root, no_leaks):
    from cfn_core.bus.shm import ShmBus

    bus = ShmBus.create(str(bus_root))
    try:
        bus.listen("a")
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, "-c", SENDER, str(bus.run_dir)])
            try:
                while not bus.wait("a", 1.0):  # one whole batch landed: the next write is under way
                    assert proc.poll() is None, "sender died on its own"
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        # the next sender repairs whatever tail the last kill left
        from cfn_core.messages import MessageFactory

        bus.deliver("a", "inbox/a", [MessageFactory("next").make("a", "peer").encode()])
        batches, torn = Counter(), 0
        for raw, _ in bus.read("a", "inbox/a"):
            try:
                msg = decode(raw)
            except MalformedMessage:
                torn += 1
                continue
            if msg.src == "killed":
                batches[(msg.id.split(".")[1], msg.body["batch"])] += 1
        assert batches, "no batch was ever written"
        partial = {k: v for k, v in batches.items() if v != 400}
        assert not partial, f"partial batches visible: {partial}"
        assert torn <= 6  # at most one marker per killed write
    finally:
        bus.destroy()


def test_killed_agent_task_is_rerun_and_every_message_counted(make_config, no_leaks, tmp_path, monkeypatch):
    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = make_config(
        plugins=("batch",),
        workload={"agents": 6, "topology": "mesh", "messages_per_agent": 40, "handler": "batch_kill_handler:die_once"},
        batch={"size": 8},
    )
    payloads = [{"die_once": str(tmp_path / "died")} if i == 2 else {"n": i} for i in range(6)]
    with Coordinator(config) as coord:
        result = coord.run(payloads)
    rnd = result.rounds[0]
    assert (tmp_path / "died").exists()
    assert all(r.ok for r in rnd.results.values()), {k: r.error for k, r in rnd.results.items() if not r.ok}
    assert len(rnd.results) == 6
    assert max(r.attempts for r in rnd.results.values()) == 2
    assert rnd.delivered == rnd.planned == 2 * 6 + 6 * 40
    assert [r.value for r in rnd.results.values()].count("survived") == 1
