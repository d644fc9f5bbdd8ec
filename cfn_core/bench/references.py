"""Reference rows: what a Python user would write instead of cfn, on the same workload.

N worker processes each receive one payload of ``[workload] payload_bytes``,
echo it back once and exit: the star workload with the echo handler.  Timed
from the first process start to the last one reaped, like a cfn cell.
"""

from __future__ import annotations

import multiprocessing
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
    t_end = time.perf_counter()
    return {
        "seconds": t_end - t0,
        "phases": {"spawn": t_spawned - t0, "distribute": t_sent - t_spawned, "execute": t_done - t_sent, "shutdown": t_end - t_done},
        "planned": 2 * agents,
        "delivered": 2 * ok,
        "failed": agents - ok,
    }


RUNNERS = {"processpool": processpool, "mp-pipes": mp_pipes}
