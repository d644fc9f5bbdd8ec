"""A pooled session opened from a worker thread keeps its agents after that thread ends (issue 13 item 16).

``PR_SET_PDEATHSIG`` fires when the *thread* that forked a child exits: before the fix,
the zygote (and with ``zygote = false`` every fresh-interpreter agent) was SIGKILLed the
moment the thread that opened the session returned, and the next run found the pool
dead (``hit_rate 0.0, died_idle 8``).  Real threads, real processes.
"""

from __future__ import annotations

import threading

import psutil
import pytest

from cfn_core import Coordinator


def _in_a_thread_that_ends(func) -> None:
    failure: list[BaseException] = []

    def body():
        try:
            func()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "fresh-interpreters"])
def test_a_session_opened_in_a_worker_thread_keeps_its_pool(make_config, no_leaks, zygote):
    size = 8
    config = make_config(plugins=["pool"], workload={"agents": size}, pool={"size": size, "zygote": zygote})
    coord = Coordinator(config)
    try:
        _in_a_thread_that_ends(coord.open)  # the opening thread is gone from here on
        pids = {h.pid for h in coord.ctx.agents.values() if h.alive}
        assert len(pids) == size
        # had they got their parent-death signal, they would be dead (or zombies) by now: the
        # kernel sends it as the thread exits, before join returns
        assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
        result = coord.run()  # from the main thread, on the pool the worker thread filled
        again = []
        _in_a_thread_that_ends(lambda: again.append(coord.run()))  # and from another short-lived thread
        result2 = again[0]
        assert {h.pid for h in coord.ctx.agents.values() if h.alive} == pids
    finally:
        coord.close()
    for res in (result, result2):
        assert res.ok and res.delivery_rate == 1.0
        figures = res.plugin_figures["pool"]
        assert figures["died_idle"] == 0 and figures["died_busy"] == 0
    assert result2.plugin_figures["pool"]["hit_rate"] == 1.0
