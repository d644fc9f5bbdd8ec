"""Lock contention of many concurrent senders: one directory and one coordinator inbox vs shards.

    python plugins/cfn-shard/bench/bench_shard_contention.py [--senders 500] [--fanin 20] [--mesh 20] [--counts 1,2,4,8,16,32,64]

``--senders`` processes (forked, all released at once by a start barrier)
each append ``--fanin`` messages to the coordinator's inbox (results, the
fan-in every coordination has) and ``--mesh`` to random agents' inboxes, one
locked write per message, as the baseline ``cfn_send`` does.  The layout is
cfn-shard's: ``count = 1`` is one directory with one coordinator inbox (the
baseline layout); ``count = k`` puts inboxes in k shard directories and splits
the coordinator's inbox so each sender appends to the part of its own shard.

Each sender first opens (creates) every inbox it will write, timed (the
directory side of contention), then measures the time it waited for flocks
(``ShmBus.lock_wait``) and its own wall time while sending; every message is read back and counted.  Counts are run
in turn, twice, interleaved, and the lower lock wait of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from cfn_core import COORDINATOR_ID
from cfn_core.bus.shm import ShmBus
from cfn_core.messages import MessageFactory

from cfn_shard.layout import location, shard_of


def sender(run_dir: str, me: str, count: int, fanin: int, mesh: int, agents: list[str], go_r: int, out_w: int) -> None:
    bus = ShmBus.attach(run_dir)
    waits: dict[str, int] = {}
    bus.lock_wait = waits
    f = MessageFactory(me)
    k_me = shard_of(me, count, "hash")
    to_coord = location(COORDINATOR_ID, k_me)
    rng = random.Random(me)
    plan = [(COORDINATOR_ID, to_coord)] * fanin
    for _ in range(mesh):
        dst = rng.choice(agents)
        plan.append((dst, location(dst, shard_of(dst, count, "hash"))))
    rng.shuffle(plan)
    records = [(dst, loc, f.make(dst, "peer", body={"pad": "x" * 100}).encode()) for dst, loc in plan]
    os.read(go_r, 1)  # the start barrier: every sender begins at once
    t_open = time.perf_counter()
    for loc in dict.fromkeys(loc for _, loc, _ in records):
        bus._append_fd(loc)  # open (and create) every inbox first: the directory part of the contention
    opened = time.perf_counter() - t_open
    t0 = time.perf_counter()
    for dst, loc, rec in records:
        bus.deliver(dst, loc, [rec])
    elapsed = time.perf_counter() - t0
    line = json.dumps({"wait_ns": sum(waits.values()), "by_dir": waits, "seconds": elapsed, "open_s": opened}).encode() + b"\n"
    os.write(out_w, line)  # < PIPE_BUF: one atomic write
    bus.close()


def one(count: int, args, agents: list[str]) -> dict:
    bus = ShmBus.create(args.root)
    try:
        for k in range(count):
            os.mkdir(bus.run_dir / f"shard-{k}", 0o700)
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pids = []
        for i in range(args.senders):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(go_w)
                    os.close(out_r)
                    sender(str(bus.run_dir), agents[i], count, args.fanin, args.mesh, agents, go_r, out_w)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                os._exit(code)
            pids.append(pid)
        os.close(go_r)
        os.close(out_w)
        t0 = time.perf_counter()
        os.write(go_w, b"x" * args.senders)
        reports = []
        with os.fdopen(out_r, "rb") as out:
            for line in out:
                reports.append(json.loads(line))
        wall = time.perf_counter() - t0
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if status:
                raise SystemExit(f"a sender failed (status {status})")
        os.close(go_w)
        # read everything back: nothing lost, nothing stranded
        got = 0
        for k in range(count):
            for name in os.listdir(bus.run_dir / f"shard-{k}"):
                inbox = f"{name}.s{k}" if name == COORDINATOR_ID else name
                got += len(bus.read(inbox, f"shard-{k}/{name}"))
        want = args.senders * (args.fanin + args.mesh)
        if got != want:
            raise SystemExit(f"count {count}: read back {got} of {want} messages")
        by_dir: dict[str, int] = {}
        for r in reports:
            for d, ns in r["by_dir"].items():
                by_dir[d] = by_dir.get(d, 0) + ns
        return {
            "count": count,
            "wait_s": sum(r["wait_ns"] for r in reports) / 1e9,
            "sender_s": sum(r["seconds"] for r in reports),
            "open_s": sum(r["open_s"] for r in reports),
            "wall": wall,
            "msgs": want,
            "max_dir_share": max(by_dir.values(), default=0) / max(1, sum(by_dir.values())),
        }
    finally:
        bus.destroy()


def _ratio(base: float, value: float) -> str:
    return f"{base / value:.1f}x" if value > 0 else ("no wait" if base > 0 else "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=500)
    ap.add_argument("--fanin", type=int, default=20, help="messages each sender appends to the coordinator's inbox")
    ap.add_argument("--mesh", type=int, default=20, help="messages each sender appends to random agents' inboxes")
    ap.add_argument("--counts", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    args = ap.parse_args(argv)
    agents = [f"agent-{i:04d}" for i in range(1, args.senders + 1)]
    counts = [int(c) for c in args.counts.split(",")]
    best: dict[int, dict] = {}
    for _ in range(args.repeat):
        for count in counts:
            r = one(count, args, agents)
            if count not in best or r["wait_s"] < best[count]["wait_s"]:
                best[count] = r
    base = best[counts[0]]
    print(
        f"{args.senders} concurrent senders, each {args.fanin} messages to the coordinator + {args.mesh} to random agents, "
        f"one locked write per message; best of {args.repeat}\n"
    )
    print(
        "| shards | lock wait, all senders (s) | lower than 1 dir by | share of sender time waiting | wall (s) | msg/s "
        "| busiest dir's share of the wait | open+create of inboxes, all senders (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in counts:
        r = best[count]
        print(
            f"| {count} | {r['wait_s']:.2f} | {_ratio(base['wait_s'], r['wait_s'])} | {r['wait_s'] / r['sender_s']:.0%} | "
            f"{r['wall']:.2f} | {r['msgs'] / r['wall']:,.0f} | {r['max_dir_share']:.0%} | {r['open_s']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
