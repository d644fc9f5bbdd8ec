"""A coordinator whose descriptors are numbered over 1024 (a pidfd per agent, a program with
many files open) still waits on what it opens next: select(2) cannot watch such numbers."""

import os
import resource
import socket

import pytest

from cfn_core import Coordinator, wait_readable

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def descriptors_over_1024():
    """Take descriptors 3..~1100, so that whatever the test opens next is numbered above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.fail(f"this test needs 1,200 descriptors; RLIMIT_NOFILE is {soft}/{hard}")
    held = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            held.append(fd)
            if fd >= 1100:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_wait_readable_watches_descriptors_select_cannot(descriptors_over_1024):
    a, b = socket.socketpair()
    try:
        assert a.fileno() > 1024
        assert wait_readable([a, b.fileno()], 0) == []
        b.send(b"x")
        assert wait_readable([a, b.fileno()], 0) == [a]  # the objects given, not their numbers
        b.close()
        a.recv(1)
        assert wait_readable([a], 5.0) == [a]  # end of file counts as readable, as for select
    finally:
        a.close()
        b.close()


def test_a_pooled_run_with_hosted_agents_over_1024(descriptors_over_1024, make_config, no_leaks):
    """The pool's zygote sockets and the hosts' pidfds get numbers over 1024: the run still completes
    (before: ``ValueError: filedescriptor out of range in select()`` when the zygote started)."""
    config = make_config(
        plugins=("pool",),
        pool={"size": 2},
        agents={
            "worker": {"count": 2, "handler": "cfn_core.handlers:echo"},
            "helper": {"count": 3, "handler": "hosted_handlers:echo", "host": "async", "hosts": 1},
        },
        workload={"directory": HERE},
    )
    with Coordinator(config) as coord:
        result = coord.run()
    rnd = result.rounds[0]
    assert result.ok and len(rnd.results) == 5 and rnd.delivered == rnd.planned, rnd.results
