"""Raw bus throughput in one process: unbatched vs cfn-batch vs a Redis pipeline, side by side.

    python plugins/cfn-batch/bench/bench_bus_raw.py [--messages 100000] [--destinations 500] [--repeat 3]

Every mode sends the same messages (random destinations, seeded) and pays the
same encoding (``Message.encode``, orjson); every message is read back and
counted, so a mode that loses anything fails loudly.  Prints one table row per
mode (best of ``--repeat``) as markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from cfn_core.bus.shm import ShmBus
from cfn_core.messages import MessageFactory

from cfn_batch import BatchSettings, Batcher
from cfn_batch.stats import BatchStats


def make_messages(n: int, destinations: int, seed: int = 1):
    rng = random.Random(seed)
    dsts = [f"agent-{i:04d}" for i in range(1, destinations + 1)]
    f = MessageFactory("bench")
    return dsts, [f.make(rng.choice(dsts), "peer", body={"n": i}) for i in range(n)]


def route(dst: str) -> str:
    return f"inbox/{dst}"


def check(bus, dsts, n):
    got = sum(len(bus.read(d, route(d))) for d in dsts)
    if got != n:
        raise SystemExit(f"delivered {got} of {n}")


def run_unbatched(root, dsts, msgs):
    bus = ShmBus.create(root)
    try:
        for d in dsts:
            bus.listen(d)
        t0 = time.perf_counter()
        for m in msgs:
            bus.deliver(m.dst, route(m.dst), [m.encode(1 << 20)])
        dt = time.perf_counter() - t0
        check(bus, dsts, len(msgs))
        return dt, {}
    finally:
        bus.destroy()


def run_batched(root, dsts, msgs, *, size=50, max_size=500, adaptive=False, per_call=1, timeout_ms=100):
    bus = ShmBus.create(root)
    counters: dict = {}
    s = BatchSettings(size=size, max_size=max_size, adaptive=adaptive, timeout_ms=timeout_ms)
    b = Batcher(bus, route, s, 1 << 20, BatchStats(counters, size))
    b.start()
    try:
        for d in dsts:
            bus.listen(d)
        t0 = time.perf_counter()
        for i in range(0, len(msgs), per_call):
            b.send(msgs[i : i + per_call])
        b.flush("explicit")
        dt = time.perf_counter() - t0
        check(bus, dsts, len(msgs))
        return dt, {"batches": counters["batch.batches"], "size_now": counters["batch.size_now"]}
    finally:
        b.close()
        bus.destroy()


def run_redis(dsts, msgs, pipeline=50):
    import redis

    r = redis.Redis()
    prefix = f"cfnbench:{os.getpid()}:"
    r.delete(*[prefix + d for d in dsts])
    try:
        t0 = time.perf_counter()
        p = r.pipeline(transaction=False)
        for i, m in enumerate(msgs, 1):
            p.xadd(prefix + m.dst, {"m": m.encode(1 << 20)})
            if i % pipeline == 0:
                p.execute()
        p.execute()
        dt = time.perf_counter() - t0
        got = sum(r.xlen(prefix + d) for d in dsts)
        if got != len(msgs):
            raise SystemExit(f"redis delivered {got} of {len(msgs)}")
        return dt, {}
    finally:
        r.delete(*[prefix + d for d in dsts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--destinations", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args(argv)
    dsts, msgs = make_messages(args.messages, args.destinations)
    modes = [
        ("unbatched (baseline cfn_send: one locked write per message)", lambda: run_unbatched(args.root, dsts, msgs)),
        ("cfn-batch size 50, one send() per message", lambda: run_batched(args.root, dsts, msgs, per_call=1)),
        ("cfn-batch size 50, send() of 100 messages", lambda: run_batched(args.root, dsts, msgs, per_call=100)),
        ("cfn-batch adaptive (50..500), send() of 100", lambda: run_batched(args.root, dsts, msgs, adaptive=True, per_call=100)),
        (
            "cfn-batch size 50, send() of 100, timeout 1 s (batches fill before the timer)",
            lambda: run_batched(args.root, dsts, msgs, per_call=100, timeout_ms=1000),
        ),
    ]
    if not args.no_redis:
        modes.append(("Redis XADD, pipelines of 50 (redis-py + hiredis)", lambda: run_redis(dsts, msgs)))
    print(f"{args.messages} messages to {args.destinations} destinations, best of {args.repeat}, python {sys.version.split()[0]}\n")
    print("| mode | msg/s | vs unbatched | batches |")
    print("|---|---:|---:|---:|")
    base = None
    for name, fn in modes:
        best, extra = None, {}
        for _ in range(args.repeat):
            dt, extra = fn()
            best = dt if best is None else min(best, dt)
        rate = args.messages / best
        base = base or rate
        print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x | {extra.get('batches', '')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
