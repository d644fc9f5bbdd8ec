"""The relay: one per machine and run, the only process there that talks to Redis.

Two threads, two connections, whatever the number of local agents:

* the *reader* holds one blocking ``XREADGROUP`` (consumer group ``cfn``,
  consumer = this host's id) over the inbox streams of every local reader and
  the host's control stream, appends each entry to the reader's spool inbox
  in one locked write and rings its doorbell;
* the *main* thread drains the spool outbox into pipelined ``XADD``\\ s, acks
  (``XACK`` + ``XDEL``) entries once the reader's settled cursor passed them,
  registers new readers (creating the group, reclaiming with ``XCLAIM`` what a
  dead host left pending, dead-lettering entries handed out ``max_deliveries``
  times), renews the leases and, on a ``cfn agent`` host, starts and watches
  agent processes on the coordinator's request.

A lost connection is retried with backoff; if Redis comes back without the
run (restarted with ``--save ""``) the relay stops with the reason in the
spool's ``relay.fatal``, which fails the coordination loudly.

A relay that dies without such a reason (SIGKILL, OOM killer, a crash) is
relaunched by the coordinator and carries on where its predecessor stopped,
from what the spool keeps (:meth:`Relay.resume`):

* ``relay.readers/AGENT``: the inbox location of every registered local reader
  (agents register once, on their first read, and do not register again);
* ``relay.journal``: one ``AGENT END ENTRY-ID`` line per stream entry, written
  *before* the entry is appended to the reader's spool inbox, END being the
  inbox size after it.  An entry still pending in Redis for this host is in
  the inbox iff the inbox is at least END long: then it is tracked for
  ``XACK`` again, else it is delivered again.  So no entry is lost or appended
  twice across a relaunch;
* the outbox cursor (the kernel's): lines not yet settled are sent again.  A
  line Redis accepted just before the kill is sent twice (at-least-once, the
  window between the pipeline's reply and the outbox ack); results are
  de-duplicated by task id and peer messages by id.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections import defaultdict, deque

from cfn_core import BusError, ShmBus, check_inbox_id

from . import keys
from .bus import FATAL, OUTBOX, RELAY_ID
from .client import Link, RunLost, describe
from .supervisor import AgentSupervisor, _Child, _kill

log = logging.getLogger("cfn.redis")

_BLOCK_MS = 1000

#: spool paths a relaunched relay resumes from (see the module docstring)
READERS_DIR = "relay.readers"
JOURNAL = "relay.journal"
#: the journal is rewritten with only the unsettled entries once it grows past this
JOURNAL_COMPACT_BYTES = 8 * 2**20


class _Track:
    """One local reader: its inbox location, stream key, and entries written locally but not yet acked."""

    __slots__ = ("agent", "location", "key", "pending")

    def __init__(self, agent: str, location: str, key: str):
        self.agent = agent
        self.location = location
        self.key = key
        self.pending: deque = deque()  # (end offset in the spool inbox, entry id)



def meta_ttl_ms(lease: float) -> int:
    """The run's own lease: generous (hosts only need it to notice a coordinator that died)."""
    return int(max(3 * lease, 15.0) * 1000)


class RunEnded(Exception):
    """The coordinator removed the run (normal end, for a `cfn agent` host)."""


def append_local(bus: ShmBus, agent: str, location: str, chunks: list[bytes], journal=None) -> list[int]:
    """Append ``chunks`` (stream entries, each one or more records) to ``agent``'s spool inbox as one write.

    The kernel's locked append (:meth:`cfn_core.ShmBus.append`): visible whole or
    not at all, a torn write of a killed writer replaced by the torn marker, rolled
    back on a full disk.  Returns the end offset of each chunk.

    :param journal: ``write(ends)``, called with the end offsets once they are known and
        *before* the data is written (the relay's journal: see the module docstring).
    """
    records = [line + b"\n" for chunk in chunks for line in chunk[:-1].split(b"\n")]
    ends: list[int] = []

    def before_write(start: int) -> None:
        pos = start
        for chunk in chunks:
            pos += len(chunk)
            ends.append(pos)
        if journal is not None:
            journal(ends)

    bus.append(agent, location, records, before_write=before_write)
    return ends


class Relay(AgentSupervisor):
    """See the module docstring.  ``capacity > 0`` makes it a `cfn agent` host that launches agents."""

    def __init__(self, url: str, run: str, spool: str, host_id: str, settings: dict, *, capacity: int = 0, coordinator: bool = False):
        self.url = url
        self.run = run
        self.spool = spool
        self.host_id = host_id
        self.host_b = host_id.encode()
        self.coordinator = coordinator
        self.capacity = capacity
        self.lease = float(settings.get("lease", 5.0))
        self.key_ttl = int(settings.get("key_ttl", 86400))
        self.max_deliveries = int(settings.get("max_deliveries", 5))
        self.pipeline = int(settings.get("pipeline", 512))
        self.read_count = int(settings.get("read_count", 1000))
        reconnect = float(settings.get("reconnect_timeout", 30.0))
        self.meta = keys.run_key(run, "meta")
        self.ctl = keys.run_key(run, f"ctl:{host_id}")
        self.ctl_b = self.ctl.encode()
        self.events = keys.run_key(run, "events")
        self.main = Link(url, self.meta, reconnect)
        self.reader_link = Link(url, self.meta, reconnect, blocking=True)
        self.main.check_run()
        self.mbus = ShmBus.attach(spool)
        self.rbus = ShmBus.attach(spool)
        self.tracks: dict[str, _Track] = {}
        self.key_agent: dict[bytes, _Track] = {}
        self.reading: dict[str, str] = {}
        self.lock = threading.Lock()
        self.control: deque = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        self.fatal: str | None = None
        self.ended = False
        self.children: dict[int, _Child] = {}
        self.expiring: set[str] = set()
        self.sel = selectors.DefaultSelector()
        self.stats = defaultdict(int)
        #: a fork server for this host's agents (a cfn_core.AgentForker: set by `cfn agent` when one
        #: of the run's plugins offers one through cfn_agent_forker), else fresh interpreters
        self.forker = None
        self._reader = None
        self._next_lease = 0.0
        self.journal_lock = threading.Lock()  # journal line + inbox append + pending, against compaction
        self.journal_path = self.mbus.run_dir / JOURNAL
        self.journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.readers_dir = self.mbus.run_dir / READERS_DIR
        self.readers_dir.mkdir(mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        lease_ms = int(self.lease * 1000)

        def setup(r):
            self._create_group(r, self.ctl)
            if not self.coordinator:
                p = r.pipeline(transaction=False)
                p.hset(keys.run_key(self.run, "hosts"), self.host_id, json.dumps(
                    {"hostname": socket.gethostname(), "pid": os.getpid(), "capacity": self.capacity}))
                p.set(keys.run_key(self.run, f"lease:{self.host_id}"), b"1", px=lease_ms)
                p.expire(keys.run_key(self.run, "hosts"), self.key_ttl)
                p.execute()

        self.main.call(setup)
        self.resume()  # before the reader starts: what a predecessor held comes before new entries
        self.mbus.listen(RELAY_ID)
        self.sel.register(self.mbus.wake_fd(RELAY_ID), selectors.EVENT_READ, "bell")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        # two I/O-bound threads hand the GIL back and forth on every message: the default 5 ms
        # switch interval would add up to 5 ms to each hop
        sys.setswitchinterval(0.001)
        self._reader = threading.Thread(target=self._read_loop, name="cfn-redis-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Ask the main loop to finish (signal-safe)."""
        self.stopping = True
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
        self.stop()

    def _create_group(self, r, key: str) -> None:
        import redis

        try:
            r.xgroup_create(key, keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if key not in self.expiring:
            r.expire(key, self.key_ttl)
            self.expiring.add(key)

    def run_forever(self) -> int:
        """The main loop.  Returns 0 after a normal end, 1 after a failure (reason in ``fatal``)."""
        next_ack = 0.0
        try:
            while not self.stopping:
                busy = any(t.pending for t in self.tracks.values())
                for key, _ in self.sel.select(0.05 if busy else min(0.5, self.lease / 3)):
                    if key.data == "bell":
                        self.mbus.drain_wakeups(RELAY_ID)
                    elif key.data == "wake":
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        self._child_exited(key.data)
                self.pump_outbox()
                self._handle_control()
                now = time.monotonic()
                if now >= next_ack:
                    self.ack_settled()
                    next_ack = now + 0.05
                self._renew_due()
            self.pump_outbox()
            self.ack_settled()
        except RunEnded:
            self.ended = True
        except RunLost as exc:
            self._fail(str(exc))
        except BusError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug must still fail the run loudly
            log.exception("relay failed")
            self._fail(f"relay error: {type(exc).__name__}: {exc}")
        finally:
            self._shutdown()
        return 1 if self.fatal else 0

    def _shutdown(self) -> None:
        self.stopping = True
        for child in list(self.children.values()):
            _kill(child)
        for child in list(self.children.values()):
            self._child_exited(child, report=not self.ended and self.fatal is None)
        if self.forker is not None:
            self.forker.close(5.0)
            self.forker = None
        if self.main.client is not None and not self.coordinator and not self.fatal:
            try:
                p = self.main.client.pipeline(transaction=False)
                p.hdel(keys.run_key(self.run, "hosts"), self.host_id)
                p.delete(keys.run_key(self.run, f"lease:{self.host_id}"))
                p.execute()
            except Exception:
                pass
        try:  # wake the blocked reader so it sees `stopping`
            self.main.client.xadd(self.ctl, {"op": "nudge"}, maxlen=100, approximate=True, nomkstream=True)
        except Exception:
            pass
        if self._reader is not None:
            self._reader.join(2.0)
        if self.fatal:
            try:
                self.mbus.write_file(FATAL, self.fatal.encode())
            except OSError:
                pass
        self.main.close()
        if self._reader is None or not self._reader.is_alive():
            self.reader_link.close()
        self.mbus.close()
        self.rbus.close()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.journal_fd)

    # ------------------------------------------------------------------ reader thread

    def _read_loop(self) -> None:
        import redis

        count = self.read_count
        seen_reconnects = self.reader_link.reconnects
        try:
            while not self.stopping:
                if self.reader_link.reconnects != seen_reconnects:
                    seen_reconnects = self.reader_link.reconnects
                    self._recover_pel()
                with self.lock:
                    streams = dict(self.reading)
                streams[self.ctl] = ">"
                try:
                    resp = self.reader_link.call(
                        lambda r: r.xreadgroup(keys.GROUP, self.host_id, streams, count=count, block=_BLOCK_MS)
                    )
                except redis.ResponseError as exc:
                    if self.stopping:
                        return
                    if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):  # the run's keys were removed
                        if not self.reader_link.client.exists(self.meta):
                            if self.coordinator:
                                raise RunLost(
                                    f"Redis at {describe(self.url)} no longer holds this run (its streams and groups are "
                                    "gone): it restarted without persistence or the keys were deleted; messages were lost"
                                ) from None
                            self.ended = True
                            self.stop()
                            return
                    raise
                for key, entries in resp or ():
                    if key == self.ctl_b:
                        self.control.extend(entries)
                        os.write(self.wake_w, b"!")
                    else:
                        track = self.key_agent.get(key)
                        if track is not None:
                            self._deliver_local(self.rbus, track, entries)
        except RunLost as exc:
            self._fail(str(exc))
        except BusError as exc:
            self._fail(str(exc))
        except Exception as exc:
            if not self.stopping:
                log.exception("relay reader failed")
                self._fail(f"relay reader error: {type(exc).__name__}: {exc}")

    def _recover_pel(self) -> None:
        """After a reconnection: entries handed to us whose reply was lost are still in our PEL; deliver them."""
        for track in list(self.key_agent.values()):
            known = {eid for _, eid in list(track.pending)}
            entries = self.reader_link.call(
                lambda r, key=track.key: r.xreadgroup(keys.GROUP, self.host_id, {key: "0"}, count=1_000_000)
            )
            for _, got in entries or ():
                missing = [(eid, fields) for eid, fields in got if eid not in known]
                if missing:
                    self.stats["recovered"] += len(missing)
                    self._deliver_local(self.rbus, track, missing)

    def _deliver_local(self, bus: ShmBus, track: _Track, entries) -> None:
        chunks, ids = [], []
        for eid, fields in entries:
            data = fields.get(b"m") if fields else None
            if data is None:
                continue  # deleted (already settled) entry
            if not data.endswith(b"\n"):
                data += b"\n"
            chunks.append(data)
            ids.append(eid)
        if not chunks:
            return
        agent_b = track.agent.encode()

        def journal(ends):
            lines = b"".join(b"%s %d %s\n" % (agent_b, end, eid) for end, eid in zip(ends, ids))
            os.write(self.journal_fd, lines)

        with self.journal_lock:
            ends = append_local(bus, track.agent, track.location, chunks, journal)
            track.pending.extend(zip(ends, ids))
        self.stats["received"] += len(chunks)
        bus.ring(track.agent)

    # ------------------------------------------------------------------ outbox -> Redis

    def _execute(self, ops: list) -> None:
        """Run ``(method, args, kwargs)`` ops, in pipelines of ``[redis] pipeline`` (1: one round trip each)."""
        if not ops:
            return
        size = self.pipeline
        if size <= 1:
            for i, (name, args, kwargs) in enumerate(ops):
                self.main.call(lambda r: getattr(r, name)(*args, **kwargs))
                if i % 64 == 63:
                    self._renew_due()
            return
        for i in range(0, len(ops), size):
            self._renew_due()  # a long backlog must not starve the leases
            chunk = ops[i : i + size]

            def run(r, chunk=chunk):
                p = r.pipeline(transaction=False)
                for name, args, kwargs in chunk:
                    getattr(p, name)(*args, **kwargs)
                return p.execute()

            self.main.call(run)

    def pump_outbox(self) -> None:
        records = self.mbus.read(RELAY_ID, OUTBOX)
        if not records:
            return
        ops: list = []
        fresh: list[str] = []
        regs: list[tuple[str, str]] = []
        run_key, run_body = None, []  # consecutive messages for one inbox become one entry

        def end_run():
            nonlocal run_key, run_body
            if run_key is not None:
                ops.append(("xadd", (run_key, {"m": b"".join(run_body)}), {}))
                if run_key not in self.expiring:
                    ops.append(("expire", (run_key, self.key_ttl), {}))
                    fresh.append(run_key)
            run_key, run_body = None, []

        for raw, _ in records:
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if line.startswith(b"!"):
                end_run()
            if line.startswith(b"!"):
                op, _, rest = line.partition(b"\t")
                if op == b"!reg":
                    agent, _, location = rest.partition(b"\t")
                    regs.append((agent.decode(), location.decode()))
                elif op == b"!bye":
                    regs = [reg for reg in regs if reg[0] != rest.decode()]
                    self.unregister(rest.decode())
                elif op == b"!dead":
                    agent, _, doc = rest.partition(b"\t")
                    try:
                        fields = json.loads(doc)
                    except ValueError:
                        fields = {"agent": agent.decode(), "reason": "unreadable dead letter", "raw_b64": base64.b64encode(doc).decode()}
                    ops += self._expire_once(keys.run_key(self.run, "dead"))
                    ops.append(("xadd", (keys.run_key(self.run, "dead"), fields), {}))
                elif op == b"!state":
                    key, _, data = rest.partition(b"\t")
                    ops.append(("hset", (keys.run_key(self.run, "state"), key, base64.b64decode(data)), {}))
                    ops += self._expire_once(keys.run_key(self.run, "state"))
                else:
                    self._dead_line(line, "unknown control line in the outbox")
                continue
            parts = line.split(b"\t", 2)
            try:
                if len(parts) != 3:
                    raise ValueError
                key = keys.inbox_key(self.run, parts[1].decode())
            except ValueError:
                end_run()
                ops.append(self._dead_op(line, "outbox line without a destination (a torn write of a killed sender)"))
                continue
            if key != run_key:
                end_run()
                run_key = key
            run_body.append(parts[2] + b"\n")
            self.stats["sent"] += 1
        end_run()
        self._execute(ops)
        self.expiring.update(fresh)
        if regs:
            self.register(regs)
        self.mbus.ack(RELAY_ID, [receipt for _, receipt in records])

    def _dead_op(self, raw: bytes, reason: str):
        self.stats["dead"] += 1
        fields = {"agent": self.host_id, "reason": reason, "raw_b64": base64.b64encode(raw[:65536])}
        return ("xadd", (keys.run_key(self.run, "dead"), fields), {})

    def _dead_line(self, raw: bytes, reason: str) -> None:
        self._execute([self._dead_op(raw, reason)] + self._expire_once(keys.run_key(self.run, "dead")))

    def _expire_once(self, key: str) -> list:
        """The op that makes ``key`` expire after ``[redis] key_ttl`` (if the coordinator never removes it)."""
        if key in self.expiring:
            return []
        self.expiring.add(key)
        return [("expire", (key, self.key_ttl), {})]

    # ------------------------------------------------------------------ readers come and go

    def register(self, readers: list[tuple[str, str]], journal: dict | None = None) -> None:
        """Start reading these ``(agent, location)`` inboxes: create their groups, reclaim, nudge the reader.

        :param journal: on a relaunch (:meth:`resume`), ``{agent: {entry id: end}}`` from the
            predecessor's journal, to tell which of this host's pending entries are in the spool.
        """
        import redis

        new, keys_now = [], []
        for agent, location in readers:
            try:
                check_inbox_id(agent)  # it becomes a file name in the spool (a host's and the host manager's too)
                key = keys.inbox_key(self.run, location)
            except Exception as exc:
                log.warning("relay: ignoring the registration of %r at %r: %s", agent[:80], location[:80], exc)
                continue
            if journal is None:
                self.mbus.write_file(f"{READERS_DIR}/{agent}", location.encode())
            track = self.tracks.get(agent)
            if track is None or track.key != key:
                new.append(_Track(agent, location, key))
            keys_now.append(key)
        if new:
            def setup(r):
                p = r.pipeline(transaction=False)
                for t in new:
                    p.xgroup_create(t.key, keys.GROUP, id="0", mkstream=True)
                    p.expire(t.key, self.key_ttl)
                for res in p.execute(raise_on_error=False):
                    if isinstance(res, redis.ResponseError) and "BUSYGROUP" not in str(res):
                        raise res
                p = r.pipeline(transaction=False)
                for t in new:
                    p.xpending(t.key, keys.GROUP)
                return p.execute()

            summaries = self.main.call(setup)
            for track, summary in zip(new, summaries):
                self.expiring.add(track.key)
                if summary.get("pending"):
                    self._reclaim(track, (journal or {}).get(track.agent, {}))
                self.tracks[track.agent] = track
                self.key_agent[track.key.encode()] = track
        with self.lock:
            for key in keys_now:
                self.reading[key] = ">"
        self.main.call(lambda r: r.xadd(self.ctl, {"op": "nudge"}, maxlen=100, approximate=True, nomkstream=True))

    def unregister(self, agent: str) -> None:
        track = self.tracks.get(agent)
        if track is not None:
            with self.lock:
                self.reading.pop(track.key, None)
            try:
                os.unlink(self.readers_dir / agent)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ relaunch

    def resume(self) -> None:
        """Carry on after a predecessor that died: its readers, and its entries by the journal."""
        readers = []
        for path in sorted(self.readers_dir.iterdir()):
            try:
                readers.append((path.name, path.read_text()))
            except (OSError, UnicodeDecodeError):
                continue
        if not readers:
            return
        journal: dict[str, dict[bytes, int]] = defaultdict(dict)
        with open(self.journal_path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and line.endswith(b"\n") and parts[1].isdigit():
                    journal[parts[0].decode(errors="replace")][parts[2]] = int(parts[1])  # the last line wins
        self.stats["relaunched"] += 1
        self.register(readers, journal=journal)
        self._compact_journal()
        log.warning("relay relaunched: %d reader(s), %d entr(ies) still in the spool, %d delivered again",
                    len(readers), self.stats["resumed"], self.stats["redelivered"])

    def _compact_journal(self) -> None:
        """Rewrite the journal with the entries not yet acked (it is only read by a relaunch)."""
        with self.journal_lock:
            lines = b"".join(b"%s %d %s\n" % (t.agent.encode(), end, eid) for t in self.tracks.values() for end, eid in t.pending)
            tmp = self.journal_path.with_name(JOURNAL + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, lines)
            finally:
                os.close(fd)
            os.replace(tmp, self.journal_path)
            os.close(self.journal_fd)
            self.journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _reclaim(self, track: _Track, journal: dict[bytes, int]) -> None:
        """Take over what other (dead) hosts were handed for this inbox and never acked, and,
        after a relaunch, what this host was handed and its predecessor did not settle.

        :param journal: the predecessor's ``{entry id: end}`` for this reader (empty on a first start).
        """
        key = track.key
        pending = self.main.call(lambda r: r.xpending_range(key, keys.GROUP, min="-", max="+", count=1_000_000))
        own = [p["message_id"] for p in pending if p["consumer"] == self.host_b]
        others = [p for p in pending if p["consumer"] != self.host_b]
        if own:
            size = self.mbus.inbox_size(track.location)
            in_spool = sorted((journal[eid], eid) for eid in own if eid in journal and journal[eid] <= size)
            track.pending.extend(in_spool)  # acked once the reader's cursor passes them, as before
            self.stats["resumed"] += len(in_spool)
            missing = [eid for eid in own if not (eid in journal and journal[eid] <= size)]
            if missing:  # read from Redis by the predecessor, never appended: deliver them now, in order
                self.stats["redelivered"] += len(missing)
                others += [{"message_id": eid, "consumer": self.host_b, "times_delivered": 0} for eid in missing]
                others.sort(key=lambda p: tuple(int(x) for x in p["message_id"].split(b"-")))
        if not others:
            return
        poison = [p["message_id"] for p in others if p["times_delivered"] >= self.max_deliveries]
        claim = [p["message_id"] for p in others if p["times_delivered"] < self.max_deliveries]
        if poison:
            ops = []
            for eid in poison:
                entries = self.main.call(lambda r, eid=eid: r.xrange(key, eid, eid))
                raw = entries[0][1].get(b"m", b"") if entries else b""
                ops.append(self._dead_op(raw, f"entry {eid.decode()} of {key} was handed out {self.max_deliveries} times "
                                              "without being settled (poison message)"))
            ops.append(("xack", (key, keys.GROUP, *poison), {}))
            ops.append(("xdel", (key, *poison), {}))
            self._execute(ops)
        for i in range(0, len(claim), 1000):
            ids = claim[i : i + 1000]
            entries = self.main.call(lambda r, ids=ids: r.xclaim(key, keys.GROUP, self.host_id, 0, ids))
            entries = sorted(entries, key=lambda e: tuple(int(x) for x in e[0].split(b"-")))
            self._deliver_local(self.mbus, track, entries)
            self.stats["reclaimed"] += len(entries)

    # ------------------------------------------------------------------ settle

    def ack_settled(self) -> None:
        """XACK (and XDEL) what local readers settled.

        Cursors are read *before* the outbox is drained: a reader settles a
        message only after the messages it caused are in the outbox, so once
        the outbox is forwarded nothing the settled entries led to can be lost
        with this host.
        """
        acks = defaultdict(list)
        cursors = [(track, self.mbus.settled_offset(track.agent)) for track in list(self.tracks.values()) if track.pending]
        if not cursors:
            return
        self.pump_outbox()
        for track, cursor in cursors:
            pending = track.pending
            while pending and pending[0][0] <= cursor:
                acks[track.key].append(pending.popleft()[1])
        if acks:
            ops = []
            for key, ids in acks.items():
                ops.append(("xack", (key, keys.GROUP, *ids), {}))
                ops.append(("xdel", (key, *ids), {}))
                self.stats["acked"] += len(ids)
            self._execute(ops)
            if os.fstat(self.journal_fd).st_size > JOURNAL_COMPACT_BYTES:
                self._compact_journal()

    # ------------------------------------------------------------------ leases

    def _renew_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_lease:
            self._next_lease = now + self.lease / 3
            self._renew()

    def _renew(self) -> None:
        lease_ms = int(self.lease * 1000)
        if self.coordinator:
            if not self.main.call(lambda r: r.pexpire(self.meta, meta_ttl_ms(self.lease))):
                raise RunLost(f"Redis at {describe(self.url)} no longer holds this run ({self.meta} is gone); messages were lost")
            return

        def renew(r):
            p = r.pipeline(transaction=False)
            p.exists(self.meta)
            p.set(keys.run_key(self.run, f"lease:{self.host_id}"), b"1", px=lease_ms, xx=True)
            return p.execute()

        alive, renewed = self.main.call(renew)
        if not alive:
            raise RunEnded()
        if not renewed:
            raise BusError(
                f"host {self.host_id} missed its lease ({self.lease:g}s, [redis] lease): the coordinator has given its "
                "agents to other hosts; stopping"
            )


def serve(url: str, run: str, spool: str, host_id: str, settings: dict) -> int:
    """Run the coordinator machine's relay until SIGTERM; 1 (reason in the spool) if it fails."""
    try:
        relay = Relay(url, run, spool, host_id, settings, coordinator=True)
        relay.start()
    except BusError as exc:
        bus = ShmBus.attach(spool)
        bus.write_file(FATAL, str(exc).encode())
        print(f"cfn redis relay: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    code = relay.run_forever()
    if relay.fatal:
        print(f"cfn redis relay: {relay.fatal}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m cfn_redis.relay``: the coordinator machine's relay as a program (the coordinator forks it)."""
    parser = argparse.ArgumentParser(prog="python -m cfn_redis.relay")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--host-id", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--settings", default="{}")
    args = parser.parse_args(argv)
    from cfn_core import die_with_parent

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    logging.basicConfig(level=logging.WARNING, format="cfn redis relay: %(message)s")
    url = os.environ.get("CFN_REDIS_URL", "redis://127.0.0.1:6379/0")
    return serve(url, args.run, args.spool, args.host_id, json.loads(args.settings))


if __name__ == "__main__":
    sys.exit(main())
