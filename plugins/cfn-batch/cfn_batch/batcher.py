"""The per-process batcher: one buffer per destination, flushed as one locked write.

The coordinator has one :class:`Batcher` from its session's start; an agent
builds its own when it first has two messages to coalesce (a second send
before its next flush, or several in one call: until then each message is
written during its send without one, see ``cfn_batch.cfn_send``).  ``send`` encodes each message once (orjson, through
``Message.encode``) and appends the bytes to its destination's buffer; a
buffer is handed to ``bus.deliver`` as one call, which the shm bus writes
under one flock with one ``write`` (all of it visible, or none of it), so the
records of a batch land together and in send order.

A buffer is flushed

* on size: when it holds ``size`` records (``size`` adapts to the observed
  message rate, see :func:`optimal_batch_size`, never beyond ``max_size``);
* on the leading edge: a ``send`` that starts a burst (no send in the
  previous ``timeout_ms / 2``) is written during the call, its records
  grouped per destination, each group after what was buffered for that
  destination, in writes of at most ``max_size`` records.  Nothing sent
  recently is there to coalesce with, and holding the call back would only
  add its wait and the sender's chance of being descheduled before its next
  flush (Nagle's rule: the first segment goes out at once, the ones that
  follow it closely are coalesced).  A send that continues a burst is
  buffered, so a program sending in a loop still gets its per-destination
  batches;
* on time: a flusher thread delivers every buffer whose oldest record has
  waited half of ``timeout_ms`` (so none waits ``timeout_ms``).  It is
  started the first time a record stays buffered after a ``send`` returns: a
  process whose sends all start bursts (an agent answering one task at a
  time) never pays for the thread;
* on ``flush(reason)``: the kernel's ``cfn_flush`` before every sleep and at
  shutdown.

One lock serializes every use of the bus by the batcher (the ShmBus object is
not thread-safe, and flock does not exclude two threads sharing a descriptor).
The flusher cannot die silently: if it raises, the death is counted and logged,
sends are delivered unbatched until it is restarted (by the next send that
leaves a record buffered, after a back-off), and the restart is counted.
Nothing is ever dropped: a delivery that fails leaves the records at the head
of their buffer and raises to the sender.  Nothing is written twice: an
interrupt (a signal handler that raises, such as the CLI's SIGTERM) arriving
after ``deliver`` wrote a batch but before it returned leaves the batch out of
the buffer: every transport says whether it was written (the Bus protocol's
``last_written``).  One flush writes every
destination it can: a destination that fails (a full inbox) does not hold back
the others, and the first error is raised after all were tried.
"""

from __future__ import annotations

import logging
import os
import _thread
import threading
import time

from .stats import BatchStats

log = logging.getLogger("cfn.batch")

#: seconds of traffic over which the message rate is measured
RATE_WINDOW = 0.25
#: after the latest send, the idle flusher polls (every half timeout, this many times)
#: before it sleeps until a sender notifies it (see _flusher_loop)
LIGHT_SLEEPS = 4
#: flusher restarts back off from this many seconds, doubling, up to RESTART_MAX
RESTART_MIN = 0.01
RESTART_MAX = 5.0


def optimal_batch_size(rate: float, timeout_s: float, floor: int, ceiling: int) -> int:
    """The batch size for one destination receiving ``rate`` messages per second.

    A size flush should carry the traffic, not the timeout: a buffer of size
    ``s`` fills in ``s / rate`` seconds, so the largest size that still fills
    within half of the timeout is ``rate * timeout_s / 2``.  Bigger batches
    amortize the per-write cost (lock, ``write``, wake-up) over more messages;
    smaller ones than ``floor`` are not worth it because the kernel flushes
    explicitly before every sleep anyway (a burst never waits for a size flush).

    :param rate: observed messages per second per destination (>= 0).
    :param timeout_s: the latency budget (``timeout_ms / 1000``).
    :param floor: smallest size returned (the configured ``size``).
    :param ceiling: largest size returned (``max_size``).
    :return: an integer in ``[floor, ceiling]``.
    """
    if ceiling < floor:
        raise ValueError(f"ceiling {ceiling} < floor {floor}")
    if not rate > 0 or not timeout_s > 0:
        return floor
    return max(floor, min(ceiling, int(rate * timeout_s / 2)))


class FlusherThread:
    """A daemon thread started without waiting for it to run.

    ``threading.Thread.start`` blocks until the new thread has been scheduled,
    which on a busy machine is a scheduling delay every agent would pay at
    start-up (py-spy: 10% of an agent's busy samples in a 20-agent mesh).
    """

    def __init__(self, target):
        self.done = threading.Event()
        self.ident: int | None = None
        self._target = target
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        self.ident = threading.get_ident()
        try:
            self._target()
        finally:
            self.done.set()

    def is_alive(self) -> bool:
        return not self.done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


class Batcher:
    """Buffers of one process.  Thread-safe; see the module docstring.

    :param bus: the process's bus (``ctx.bus``).
    :param route: ``ctx.route`` (destination id -> location).
    :param settings: the ``[batch]`` table.
    :param max_message_bytes: ``[bus] max_message_bytes`` (checked when encoding).
    :param stats: where figures go (:class:`~cfn_batch.stats.BatchStats`).
    """

    def __init__(self, bus, route, settings, max_message_bytes: int, stats: BatchStats):
        self.bus = bus
        self.route = route
        self.limit = max_message_bytes
        self.timeout = settings.timeout_ms / 1000.0
        self.floor = min(settings.size, settings.max_size)
        self.max_size = settings.max_size
        self.adaptive = settings.adaptive
        self.size = self.floor
        self.stats = stats
        self.pid = os.getpid()
        self.lock = _thread.allocate_lock()  # guards everything below
        #: made with the flusher thread, on ``lock`` (an agent whose sends all start a burst, such as
        #: a star round's one result, never needs it: a forked agent builds nothing it does not use)
        self.cond: threading.Condition | None = None
        self.buffers: dict[str, list[bytes]] = {}  # only non-empty buffers, in first-use order
        #: destination -> monotonic arrival time of each buffered record (ascending, parallel to its buffer)
        self.arrivals: dict[str, list[float]] = {}
        self.closed = False  # after close(): every send is delivered at once
        self.thread: FlusherThread | None = None
        self.idle = False  # the flusher waits for a first record
        self.restart_at = 0.0
        self.restart_delay = RESTART_MIN
        self.fault = None  # tests: an exception the flusher raises once (see test_batch_flusher)
        self._last_send = float("-inf")  # monotonic time of the latest send (a send after a pause starts a burst)
        self._window_start = time.monotonic()
        self._window_msgs = 0
        self._window_dsts: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the flusher thread now (idempotent).  Without this call it starts when first needed."""
        with self.lock:
            if not self.closed and (self.thread is None or not self.thread.is_alive()):
                self._start_locked()

    def _start_locked(self) -> None:
        if self.cond is None:
            self.cond = threading.Condition(self.lock)
        self.thread = FlusherThread(self._flusher)

    def close(self) -> None:
        """Deliver everything (reason ``shutdown``), stop the flusher; later sends go out at once."""
        with self.lock:
            self.closed = True
            try:
                self._flush_all_locked("shutdown")
            finally:
                if self.cond is not None:
                    self.cond.notify_all()
        thread = self.thread
        if thread is not None and thread.ident != threading.get_ident():
            thread.join(timeout=5.0)

    def _keep_flusher_locked(self) -> None:
        """Records stay buffered: a flusher must be running (started on first need, or restarted, counted)."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            return
        if thread is not None:
            self.stats.flusher_restart()
            log.warning("cfn-batch: flusher thread restarted (pid %d)", os.getpid())
        self._start_locked()

    # ------------------------------------------------------------------ sending

    def send(self, messages, at_once: bool = False) -> None:
        """Buffer ``messages`` (encoded now: an oversized message raises here, nothing is buffered).

        ``at_once``: the caller flushes right after (``cfn_send``'s ``flush``): write
        them now, grouped per destination after what is buffered for each, as a
        call that starts a burst is.
        """
        limit = self.limit
        records = [(m.dst, m.encode(limit)) for m in messages]
        now = time.monotonic()
        with self.lock:
            thread = self.thread
            running = thread is not None and not thread.done.is_set()
            if not running and (self.closed or (thread is not None and now < self.restart_at)):
                # closed, or the flusher died and its back-off runs: nothing may wait in a buffer
                self._send_unbatched_locked(records, now)
                return
            if len(records) == 1 and not self.buffers and (at_once or now - self._last_send >= self.timeout / 2):
                # one message starting a burst with nothing buffered (an agent's result, a reply): what
                # _send_now_locked does for it, without its grouping (the hot path of a star round)
                self._send_one_locked(records[0], now)
                return
            was_empty = not self.buffers
            self._window_msgs += len(records)
            starts_burst = at_once or now - self._last_send >= self.timeout / 2
            self._last_send = now
            if starts_burst:
                self._send_now_locked(records, now)
            else:
                size, buffers, arrivals, dsts = self.size, self.buffers, self.arrivals, self._window_dsts
                for dst, rec in records:  # _buffer_locked, inlined: the per-record path
                    dsts.add(dst)
                    buf = buffers.get(dst)
                    if buf is None:
                        buffers[dst] = buf = [rec]
                        arrivals[dst] = [now]
                    else:
                        buf.append(rec)
                        arrivals[dst].append(now)
                    if len(buf) >= size:
                        self._flush_locked(dst, "size", now)
            if self.adaptive and now - self._window_start >= RATE_WINDOW:
                self._adapt_locked(now)
            if self.buffers:
                if not running:
                    self._keep_flusher_locked()
                elif was_empty and self.idle:
                    self.cond.notify()

    def continue_burst(self) -> None:
        """Take the next send as one that continues a burst (buffered, not written during the call).

        For a batcher built by a second send since the latest flush (``cfn_batch.cfn_send``
        wrote the first without one).
        """
        with self.lock:
            self._last_send = time.monotonic()

    def keep(self, dst: str, rec: bytes) -> None:
        """Buffer a record that a write outside the batcher failed to write (the next flush writes it)."""
        with self.lock:
            self._buffer_locked(dst, rec, time.monotonic())

    def _send_one_locked(self, record: tuple[str, bytes], now: float) -> None:
        """Write one record at once (nothing is buffered anywhere); on failure it is buffered, as in _send_now_locked."""
        dst, rec = record
        self._window_msgs += 1
        self._last_send = now
        self._window_dsts.add(dst)
        bus = self.bus
        try:
            bus.last_written = False
            bus.deliver(dst, self.route(dst), [rec])
        except BaseException:
            if not bus.last_written:  # not written: kept for the next flush, in order
                self._buffer_locked(dst, rec, now)
            raise
        self.stats.batch("leading", 1, len(rec), now, None)
        if self.adaptive and now - self._window_start >= RATE_WINDOW:
            self._adapt_locked(now)

    def _buffer_locked(self, dst: str, rec: bytes, now: float) -> list[bytes]:
        """Append ``rec`` to ``dst``'s buffer (started if empty), noting its arrival; the buffer."""
        buf = self.buffers.get(dst)
        if buf is None:
            buf = self.buffers[dst] = []
            self.arrivals[dst] = []
        buf.append(rec)
        self.arrivals[dst].append(now)
        return buf

    def _send_now_locked(self, records, now: float) -> None:
        """A call that starts a burst: per destination, everything buffered plus its group, written now.

        Grouped in one pass; a destination with nothing buffered (the common case)
        is written straight from its group, in writes of at most ``max_size``.  A
        write that fails leaves its unwritten records and every later group
        buffered, in order (flushed later), none lost, and raises.
        """
        groups: dict[str, list[bytes]] = {}
        for dst, rec in records:
            group = groups.get(dst)
            if group is None:
                groups[dst] = [rec]
            else:
                group.append(rec)
        self._window_dsts.update(groups)
        buffers, cap, route, batch = self.buffers, self.max_size, self.route, self.stats.batch
        bus = self.bus
        pending = iter(groups.items())
        for dst, group in pending:
            if dst in buffers:  # after what was buffered for it, through the buffer
                for rec in group:
                    self._buffer_locked(dst, rec, now)
                while len(buffers[dst]) > cap:
                    self._flush_locked(dst, "leading", now, cap)
                self._flush_locked(dst, "leading", now)
                continue
            done = in_flight = 0
            try:
                while done < len(group):
                    chunk = group if not done and len(group) <= cap else group[done : done + cap]
                    in_flight = len(chunk)
                    bus.last_written = False
                    bus.deliver(dst, route(dst), chunk)
                    done += in_flight
                    in_flight = 0
                    batch("leading", len(chunk), sum(map(len, chunk)), now, None)
            except BaseException:
                if in_flight and bus.last_written:
                    done += in_flight  # interrupted after the write: written, not to be sent again
                for rec in group[done:]:
                    self._buffer_locked(dst, rec, now)
                for later, rest in pending:
                    for rec in rest:
                        self._buffer_locked(later, rec, now)
                raise

    def _send_unbatched_locked(self, records, now: float) -> None:
        """The flusher is down: every record goes out at once, after whatever is buffered for its destination."""
        for dst, rec in records:
            self._buffer_locked(dst, rec, now)
            self._flush_locked(dst, "unbatched" if not self.closed else "closed", now)
        if not self.closed:
            self.stats.unbatched(len(records))

    def flush(self, reason: str) -> None:
        """Deliver every buffer now."""
        with self.lock:
            if self.buffers:
                self._flush_all_locked(reason)

    def _flush_all_locked(self, reason: str) -> None:
        """Every buffer, each tried even when an earlier one fails; the first error is raised."""
        now = time.monotonic()
        first_error = None
        for dst in list(self.buffers):
            try:
                self._flush_locked(dst, reason, now)
            except Exception as exc:  # e.g. that inbox is full: its records stay buffered
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def _flush_locked(self, dst: str, reason: str, now: float, count: int | None = None) -> None:
        """One ``deliver`` of ``dst``'s buffer (its first ``count`` records, default all).

        The records leave the buffer only once written: on failure they all stay, in
        order, and it raises.  ``now`` is when the flush began: each record's added
        latency is ``now`` minus its arrival.  The writes of other destinations
        before this one in the same flush are not counted: unbatched, the same
        messages would be written one after another too.
        """
        buf = self.buffers[dst]
        times = self.arrivals[dst]
        if count is None or count >= len(buf):
            batch, waited = buf, times
        else:
            batch, waited = buf[:count], times[:count]
        bus = self.bus
        bus.last_written = False
        returned = False
        try:
            bus.deliver(dst, self.route(dst), batch)
            returned = True
        finally:
            # Straight-line code, no call before the records leave the buffer: Python runs a
            # signal handler only at a call or a loop's jump, so an interrupt cannot land
            # between "written" and "out of the buffer" (else close() would write them again).
            if returned or bus.last_written:
                if batch is buf:
                    del self.buffers[dst], self.arrivals[dst]
                else:
                    del buf[:count], times[:count]
        self.stats.batch(reason, len(batch), sum(map(len, batch)), now, waited)

    def _adapt_locked(self, now: float) -> None:
        elapsed = now - self._window_start
        per_dst = self._window_msgs / elapsed / max(1, len(self._window_dsts))
        self.size = optimal_batch_size(per_dst, self.timeout, self.floor, self.max_size)
        self.stats.size_now(self.size)
        self._window_start = now
        self._window_msgs = 0
        self._window_dsts = set()

    # ------------------------------------------------------------------ the flusher thread

    def _flusher(self) -> None:
        try:
            self._flusher_loop()
        except BaseException as exc:  # counted, logged, restarted by the next send or flush
            with self.lock:
                self.stats.flusher_death()
                self.restart_at = time.monotonic() + self.restart_delay
                self.restart_delay = min(self.restart_delay * 2, RESTART_MAX)
            log.warning(
                "cfn-batch: flusher thread died (%s: %s); sending unbatched until it is restarted",
                type(exc).__name__,
                exc,
            )

    def _flusher_loop(self) -> None:
        half = self.timeout / 2
        cond = self.cond
        with cond:
            while not self.closed:
                if self.fault is not None:
                    exc, self.fault = self.fault, None
                    raise exc
                if not self.buffers:
                    if time.monotonic() - self._last_send < half * LIGHT_SLEEPS:
                        # sends are coming: look again in half the timeout instead of being
                        # notified, so a send does not wake this thread (a GIL hand-over and
                        # two thread switches) every time an explicit flush emptied the
                        # buffers before it; a record still waits at most half the timeout
                        cond.wait(half)
                        continue
                    self.idle = True
                    cond.wait()  # a sender notifies when the first record arrives
                    self.idle = False
                    continue
                now = time.monotonic()
                oldest = min(times[0] for times in self.arrivals.values())
                if now - oldest < half:
                    cond.wait(oldest + half - now)
                    continue
                due = [d for d, times in self.arrivals.items() if now - times[0] >= half * 0.5]
                for dst in due:
                    try:
                        self._flush_locked(dst, "timeout", now)
                    except Exception as exc:  # e.g. a full bus: keep the records, try again later
                        self.stats.deliver_error()
                        log.warning("cfn-batch: timed flush to %s failed (%s); will retry", dst, exc)
                        cond.wait(half)
                        break
                self.restart_delay = RESTART_MIN  # a working flusher resets the back-off
