"""Reference rows: what a Python user would write instead of cfn, on the same workload.

N worker processes each receive one payload of ``[workload] payload_bytes``,
echo it back once and exit: the star workload with the echo handler.  Timed
from the first process start to the last one reaped, like a cfn cell.

Two rows are the standard library a user would reach for (``processpool``,
``mp-pipes``); the third, ``floor``, is the least any Python parent can do for
the same work: ``os.fork()`` N times, one raw pipe message each way, reap.  It
is the floor cfn's time is measured against, not a peer.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from ..process import interrupts_deferred

# The workers are forked inside interrupts_deferred(): they inherit its handler, which only
# notes a SIGINT, so the terminal's Ctrl-C (sent to the whole foreground process group,
# these forks included) never makes a worker print a KeyboardInterrupt traceback; the
# bench itself handles the Ctrl-C as soon as the workers are started.


def _echo(payload):
    return payload


def _pipe_worker(conn) -> None:
    conn.send(conn.recv())
    conn.close()


def processpool(agents: int, payload: str, probe: Callable[[], None] | None = None) -> dict:
    """``ProcessPoolExecutor(max_workers=N)``, N tasks submitted at once.

    With the fork start method the executor starts all N workers inside the
    first ``submit``, so that time is reported as spawn.  ``probe`` (untimed
    runs only) is called while every worker is alive.
    """
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=agents) as pool:
        with interrupts_deferred():  # the first submit forks every worker (see above)
            futures = [pool.submit(_echo, payload) for _ in range(agents)]
        t_sent = time.perf_counter()
        results = [f.result() for f in futures]
        t_done = time.perf_counter()
        if probe is not None:
            probe()
    t_end = time.perf_counter()
    ok = sum(1 for r in results if r == payload)
    return {
        "seconds": t_end - t0,
        "phases": {"spawn": t_sent - t0, "execute": t_done - t_sent, "shutdown": t_end - t_done},
        "planned": 2 * agents,
        "delivered": 2 * ok,
        "failed": agents - ok,
    }


def mp_pipes(agents: int, payload: str, probe: Callable[[], None] | None = None) -> dict:
    """N ``multiprocessing.Process`` with a ``Pipe`` each: start all, send, receive, join.

    ``probe`` (untimed runs only) is called once every worker is started.
    """
    ctx = multiprocessing.get_context()
    t0 = time.perf_counter()
    procs, conns = [], []
    try:
        with interrupts_deferred():  # see above
            for _ in range(agents):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_pipe_worker, args=(child,), daemon=True)
                proc.start()
                child.close()
                procs.append(proc)
                conns.append(parent)
        t_spawned = time.perf_counter()
        if probe is not None:
            probe()
        for conn in conns:
            conn.send(payload)
        t_sent = time.perf_counter()
        ok = 0
        for conn in conns:
            try:
                ok += conn.recv() == payload
            except EOFError:
                pass
        t_done = time.perf_counter()
    except BaseException:  # interrupted: the workers wait in recv; do not give each 5 s to exit
        for proc in procs:
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()
        for conn in conns:
            conn.close()
    return _figures(agents, ok, t0, t_spawned, t_sent, t_done, time.perf_counter())


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``, fewer only at end of file."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _floor_child(inbox: int, outbox: int) -> None:
    """In a forked child: read one length-prefixed message, write it back, exit without cleanup.

    ``os._exit`` always: the child must not run the parent's atexit handlers,
    flush its copies of the parent's buffers or unwind into the bench.
    """
    code = 1
    try:
        head = _read_exactly(inbox, 4)
        body = _read_exactly(inbox, int.from_bytes(head, "big")) if len(head) == 4 else b""
        _write_all(outbox, head + body)
        code = 0
    finally:
        os._exit(code)


def fork_floor(agents: int, payload: str, probe: Callable[[], None] | None = None) -> dict:
    """The raw fork floor: ``os.fork()`` N children, send each the payload over a pipe, read the echoes, reap.

    No pool, no pickling, no bus: the process starts and one message each way
    are all that is left, so no runtime of N processes can be faster in Python.
    Each message is length-prefixed because a child cannot wait for end of
    file: the children forked after it hold copies of its pipe's write end.
    ``probe`` (untimed runs only) is called once every child is forked.
    """
    message = payload.encode()
    message = len(message).to_bytes(4, "big") + message
    t0 = time.perf_counter()
    children: list[int] = []
    fds: list[int] = []  # the parent's ends: (to child, from child) per child
    ok = 0
    try:
        with interrupts_deferred():  # the children inherit the noting handler (see above)
            for _ in range(agents):
                inbox, to_child = os.pipe()
                from_child, outbox = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(to_child)
                    os.close(from_child)
                    _floor_child(inbox, outbox)
                children.append(pid)
                os.close(inbox)
                os.close(outbox)
                fds += [to_child, from_child]
        t_spawned = time.perf_counter()
        if probe is not None:
            probe()
        for to_child in fds[0::2]:
            _write_all(to_child, message)
        t_sent = time.perf_counter()
        for from_child in fds[1::2]:
            ok += _read_exactly(from_child, len(message)) == message
        t_done = time.perf_counter()
    except BaseException:  # interrupted: the children wait in read; nobody else will stop them
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        for pid in children:
            os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
    return _figures(agents, ok, t0, t_spawned, t_sent, t_done, time.perf_counter())


def _figures(agents: int, ok: int, t0: float, t_spawned: float, t_sent: float, t_done: float, t_end: float) -> dict:
    """A reference row's result: the phases between the timestamps, and what came back."""
    return {
        "seconds": t_end - t0,
        "phases": {"spawn": t_spawned - t0, "distribute": t_sent - t_spawned, "execute": t_done - t_sent, "shutdown": t_end - t_done},
        "planned": 2 * agents,
        "delivered": 2 * ok,
        "failed": agents - ok,
    }


RUNNERS = {"processpool": processpool, "mp-pipes": mp_pipes, "floor": fork_floor}
