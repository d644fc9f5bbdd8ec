"""The Redis Streams bus as a process sees it: a local spool plus, on the coordinator, Redis.

Every machine taking part in a run has one *spool*: a private run directory
of the kernel's /dev/shm bus (:class:`cfn_core.bus.shm.ShmBus`) and one
*relay* process that moves messages between the spool and Redis:

* a sender appends each ``deliver`` call as one batch to the spool's
  ``relay/outbox`` (one ``dst TAB location TAB record`` line per message, the
  batch visible whole or not at all like any shm batch) and rings the relay;
  the relay turns each run of consecutive lines for one inbox into one
  ``XADD`` on that inbox's stream (pipelined, ``transaction=False``) and
  settles the outbox lines only after Redis accepted them;
* the relay holds the one blocking ``XREADGROUP`` for every local reader,
  appends what it reads to the reader's spool inbox and rings its doorbell;
  it ``XACK``\\ s an entry once the reader's settled cursor has passed it, so
  at-least-once holds end to end.

So agents never import ``redis`` nor hold a connection: connections scale
with machines, not agents, and an agent starts as fast as on the shm bus.
:class:`LocalBus` is what agents (and forked pool agents) get;
:class:`HubBus` is the coordinator's, which also creates the run in Redis,
starts the local relay and answers run-wide questions (state, dead letters).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time

import orjson

from cfn_core import BusError, ShmBus, wait_readable

from . import keys

log = logging.getLogger("cfn.redis")

#: the relay's reader id in the spool, and its outbox location
RELAY_ID = "_relay"
OUTBOX = "relay/outbox"
#: spool state file naming the Redis run
RUN_STATE = "redis.run"
#: spool file where a relay leaves the reason it stopped
FATAL = "relay.fatal"
#: a relay that dies without a reason is relaunched, unless it died this many times ...
RELAY_RESTARTS = 5
#: ... within this many seconds (then it is crash-looping: the run fails with the reason)
RELAY_RESTART_WINDOW = 60.0


def outbox_records(dst: str, location: str, records: list[bytes]) -> list[bytes]:
    """One outbox line per message: ``dst TAB location TAB record``."""
    head = b"%s\t%s\t" % (dst.encode(), location.encode())
    return [head + (r if r.endswith(b"\n") else r + b"\n") for r in records]


class LocalBus(ShmBus):
    """An agent's view: read and ack the local spool, send through the relay."""

    name = "redis"
    split_inboxes = False  # remote senders reach an inbox through its stream, by id alone

    def __init__(self, run_dir, **kwargs):
        super().__init__(run_dir, **kwargs)
        self._registered: dict[str, str] = {}
        info = self._run_info()
        self.run_id = info.get("run", self.run_dir.name)

    def _run_info(self) -> dict:
        try:
            return json.loads(ShmBus.get_state(self, RUN_STATE) or b"{}")  # the spool's, not Redis's
        except (OSError, ValueError, BusError):
            return {}

    def after_fork(self) -> None:
        super().after_fork()
        self._registered = {}

    # ------------------------------------------------------------------ through the relay

    def _to_relay(self, line: bytes) -> None:
        ShmBus.deliver(self, RELAY_ID, OUTBOX, [line])

    def deliver(self, dst: str, location: str, records: list[bytes]) -> None:
        """One outbox batch per call: the relay makes it (at least) one stream entry, whole."""
        if records:
            ShmBus.deliver(self, RELAY_ID, OUTBOX, outbox_records(dst, location, records))

    def read(self, agent_id: str, location: str):
        if self._registered.get(agent_id) != location:
            # the relay starts reading this inbox's stream (and reclaims what a dead host held)
            self._registered[agent_id] = location
            self._to_relay(b"!reg\t%s\t%s\n" % (agent_id.encode(), location.encode()))
        return super().read(agent_id, location)

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        doc = orjson.dumps({"agent": agent_id, "reason": reason, "raw_b64": base64.b64encode(record[:65536]).decode()})
        self._to_relay(b"!dead\t%s\t%s\n" % (agent_id.encode(), doc))

    def put_state(self, key: str, data: bytes) -> None:
        super().put_state(key, data)
        self._to_relay(b"!state\t%s\t%s\n" % (key.encode(), base64.b64encode(data)))

    def close(self) -> None:
        if self._registered and self.pid == os.getpid():  # not a forked child's inherited copy
            try:
                for agent_id in self._registered:
                    self._to_relay(b"!bye\t%s\n" % agent_id.encode())
            except OSError:
                pass
        self._registered = {}
        super().close()


class HubBus(LocalBus):
    """The coordinator's bus: creates the run in Redis, runs the local relay, removes it all at the end."""

    def __init__(self, run_dir, **kwargs):
        super().__init__(run_dir, **kwargs)
        self.link = None
        self.failed: str | None = None  # set once the run failed: shutdown must not raise again
        self.relay = None
        self.relay_args = None
        self.relay_restarts: list[float] = []  # when the relay was relaunched recently (monotonic)
        self.relaunches = 0  # relaunches in the whole run
        self.settings = None
        self.host_id = None
        self.url = None

    @classmethod
    def open(cls, config) -> "HubBus":
        """Connect (a clear error if Redis cannot be reached), create the run, start the relay."""
        from .client import Link

        settings = config.section("redis")
        run = secrets.token_hex(8)
        link = Link(settings.url, None, settings.reconnect_timeout)
        spool = ShmBus.create(config.bus.root or None, max_message_bytes=config.bus.max_message_bytes)
        spool.close()
        host_id = f"c-{socket.gethostname()[:24]}-{os.getpid()}-{run[:6]}"
        spool.put_state(RUN_STATE, json.dumps({"run": run, "host": host_id}).encode())
        bus = cls(spool.run_dir, max_message_bytes=config.bus.max_message_bytes, owner=True)
        bus.link, bus.settings, bus.host_id, bus.url = link, settings, host_id, settings.url
        try:
            meta = keys.run_key(run, "meta")
            from .relay import meta_ttl_ms

            lease_ms = meta_ttl_ms(settings.lease)

            def create(r):
                p = r.pipeline(transaction=False)
                p.hset(meta, mapping={"created": time.time(), "host": host_id, "hostname": socket.gethostname(), "pid": os.getpid()})
                p.pexpire(meta, lease_ms)
                p.zadd(keys.RUNS, {run: time.time()})
                p.zremrangebyscore(keys.RUNS, "-inf", time.time() - settings.key_ttl)  # runs of crashed coordinators
                p.execute()

            link.call(create)
            link.meta_key = meta
            bus._start_relay(config)
        except BaseException:
            bus.destroy()
            raise
        return bus

    def _start_relay(self, config) -> None:
        s = self.settings
        settings = {k: getattr(s, k) for k in ("lease", "key_ttl", "reconnect_timeout", "max_deliveries", "pipeline", "read_count")}
        self.relay_args = (self.url, self.run_id, self.run_ref, self.host_id, settings)
        self.relay = ForkedRelay.start(*self.relay_args)

    def relay_failure(self) -> str | None:
        """Why the relay stopped for good, or None while it runs (or was relaunched).

        A relay that stopped on a failure (Redis lost the run, could not be reached
        within ``reconnect_timeout``) leaves the reason in the spool: the run fails.
        One that died without a reason (SIGKILL, the OOM killer, a crash) is
        relaunched here and resumes from the spool (see :mod:`cfn_redis.relay`),
        unless it died :data:`RELAY_RESTARTS` times within :data:`RELAY_RESTART_WINDOW` s.
        """
        try:
            reason = (self.run_dir / FATAL).read_text().strip()
        except OSError:
            reason = None
        if reason or self.relay is None or self.relay.poll() is None:
            return reason
        status = self.relay.returncode
        now = time.monotonic()
        self.relay_restarts = [t for t in self.relay_restarts if now - t < RELAY_RESTART_WINDOW]
        if len(self.relay_restarts) >= RELAY_RESTARTS:
            return (f"the relay process died {len(self.relay_restarts) + 1} times within {RELAY_RESTART_WINDOW:g}s "
                    f"(last exit status {status}); not relaunching it again")
        log.warning("the Redis relay (pid %d) died with status %s; relaunching it", self.relay.pid, status)
        self.relay_restarts.append(now)
        self.relaunches += 1
        self.relay = ForkedRelay.start(*self.relay_args)
        return None

    def check(self) -> None:
        """Raise BusError when the relay failed or Redis lost the run (called every coordinator tick).

        Relaunches a relay that died without a reason (:meth:`relay_failure`).
        """
        reason = self.relay_failure()
        if reason:
            self.failed = reason
            raise BusError(f"Redis bus failed: {reason}")

    # ------------------------------------------------------------------ run-wide answers from Redis

    def put_state(self, key: str, data: bytes) -> None:
        ShmBus.put_state(self, key, data)  # local agents read it from the spool
        self._write(lambda p: p.hset(keys.run_key(self.run_id, "state"), key, data), "state")

    def _write(self, op, name: str) -> None:
        """One write to a run-wide key, which expires after ``[redis] key_ttl`` if the run is never removed."""
        key = keys.run_key(self.run_id, name)

        def run(r):
            p = r.pipeline(transaction=False)
            op(p)
            p.expire(key, int(self.settings.key_ttl))
            p.execute()

        self.link.call(run)

    def get_state(self, key: str) -> bytes | None:
        return self.link.call(lambda r: r.hget(keys.run_key(self.run_id, "state"), key))

    def dead_letter(self, agent_id: str, record: bytes, reason: str) -> None:
        fields = {"agent": agent_id, "reason": reason, "raw_b64": base64.b64encode(record[:65536])}
        self._write(lambda p: p.xadd(keys.run_key(self.run_id, "dead"), fields), "dead")

    def dead_letter_count(self) -> int:
        return self.link.call(lambda r: r.xlen(keys.run_key(self.run_id, "dead")))

    def dead_letters(self) -> list[dict]:
        entries = self.link.call(lambda r: r.xrange(keys.run_key(self.run_id, "dead")))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    # ------------------------------------------------------------------ end of the run

    def stop_relay(self) -> None:
        relay, self.relay = self.relay, None
        if relay is None:
            return
        if relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()

    def destroy(self) -> None:
        """Stop the relay, remove every key of the run and the spool."""
        try:
            self.stop_relay()
        finally:
            try:
                if self.link is not None and self.link.client is not None:
                    try:
                        remove_run(self.link.client, self.run_id)
                    except Exception as exc:  # Redis gone: the keys expire on their own
                        log.warning("could not remove run %s from Redis (%s); its keys expire after [redis] key_ttl", self.run_id, exc)
            finally:
                if self.link is not None:
                    self.link.close()
                super().destroy()


class ForkedRelay:
    """The coordinator machine's relay, forked from the coordinator (a Popen-like handle).

    Forked rather than started as a fresh interpreter: this process has already
    imported redis, so the relay runs within milliseconds instead of the ~1 s an
    interpreter importing redis takes on a busy machine, and every agent's first
    message would wait for it.  The child dies with the coordinator
    (``PR_SET_PDEATHSIG``), touches none of the parent's objects and leaves with
    ``os._exit``.  (``python -m cfn_redis.relay`` is the same relay as a program.)
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None
        self._pidfd = os.pidfd_open(pid)

    @classmethod
    def start(cls, url: str, run: str, spool: str, host_id: str, settings: dict) -> "ForkedRelay":
        from cfn_core import die_with_parent

        from . import relay as relay_mod  # import before forking: the child must not import

        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the relay
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with_parent(parent)
                code = relay_mod.serve(url, run, spool, host_id, settings)
            except BaseException:
                pass
            finally:
                os._exit(code)
        return cls(pid)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None):
        if self.returncode is None:
            if not wait_readable([self._pidfd], timeout):
                raise subprocess.TimeoutExpired(f"relay {self.pid}", timeout)
            self._reaped(os.waitpid(self.pid, 0)[1])
        return self.returncode


def remove_run(client, run: str) -> int:
    """Delete every key of ``run`` (SCAN + UNLINK) and its discovery entry."""
    removed = 0
    for pattern in keys.run_patterns(run):
        batch = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += client.unlink(*batch)
                batch = []
        if batch:
            removed += client.unlink(*batch)
    client.zrem(keys.RUNS, run)
    return removed
