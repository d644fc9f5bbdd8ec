"""A second "machine": agents run by a separate `cfn agent` process joining the coordination.

The separate process has its own spool, relay and agents and talks to the
coordinator only through Redis, exactly as on another host.  Where ``ip netns``
works (root with CAP_NET_ADMIN), one test runs it in another network namespace,
reaching Redis over a veth pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from cfn_core import Coordinator
from cfn_core.bus.shm import find_runs, remove_tree
from cfn_core.plugins import installed

from redis_servers import RedisServer, run_keys

pytestmark = pytest.mark.redis


def start_host(url: str, run: str, agents: int, root, prefix=()) -> subprocess.Popen:
    cmd = [*prefix, sys.executable, "-m", "cfn_core", "agent", "--bus", url, "--run", run,
           "--agents", str(agents), "--root", str(root), "--wait", "30"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_host(host: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = host.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        host.kill()
        _, err = host.communicate()
        raise AssertionError(f"cfn agent did not leave after the run: {err.decode(errors='replace')}")
    return host.returncode, err.decode(errors="replace")


def _remote_run(config, url, bus_root, agents_per_host=10, hosts=1, prefix=(), progress=None):
    coord = Coordinator(config, progress=progress)
    procs = []
    try:
        coord.open()
        run = coord.ctx.bus.run_id
        procs = [start_host(url, run, agents_per_host, bus_root, prefix) for _ in range(hosts)]
        if progress is not None:
            progress.coord, progress.hosts = coord, procs
        result = coord.run()
        placed = {h.id: h.info.get("host") for h in coord.ctx.agents.values()}
    except BaseException:
        coord.close()
        for p in procs:
            p.kill()
            p.communicate()
        raise
    coord.close()
    outcomes = [finish_host(p) for p in procs]
    return result, placed, outcomes, run


def test_agents_of_a_separate_cfn_agent_process_join(no_leaks, redis_config, redis_url, bus_root):
    config = redis_config(redis={"wait_hosts": 1, "local_agents": 0}, workload={"agents": 6, "tasks": 24, "rounds": 2})
    result, placed, outcomes, run = _remote_run(config, redis_url, bus_root)
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
    assert all(placed.values()) and len(set(placed.values())) == 1, placed  # every agent on the joined host
    assert result.plugin_figures["redis"]["hosts_joined"] == 1
    (code, err), = outcomes
    assert code == 0, err
    assert "joined run" in err and "ended" in err
    assert run_keys(redis_url, run) == []


def test_agents_spread_over_two_hosts(no_leaks, redis_config, redis_url, bus_root):
    config = redis_config(redis={"wait_hosts": 2, "local_agents": 0}, workload={"agents": 8})
    result, placed, outcomes, _ = _remote_run(config, redis_url, bus_root, agents_per_host=4, hosts=2)
    assert result.ok and result.delivery_rate == 1.0
    assert len(set(placed.values())) == 2
    assert [code for code, _ in outcomes] == [0, 0]


class KillHostOnCollect:
    def __init__(self):
        self.coord = self.hosts = None
        self.fired = False

    def __call__(self, phase, done, total):
        if phase == "collect" and not self.fired:
            self.fired = True
            self.hosts[0].kill()  # SIGKILL: its relay and (by PDEATHSIG) its agents die with it
            self.hosts[0].wait()


def test_a_host_that_dies_has_its_tasks_reclaimed(no_leaks, redis_config, redis_url, bus_root):
    config = redis_config(
        redis={"wait_hosts": 1, "lease": 1.0},
        workload={"agents": 4, "tasks": 12, "command": "sleep 0.4; cat", "payload_bytes": 8},
    )
    killer = KillHostOnCollect()
    result, placed, outcomes, _ = _remote_run(config, redis_url, bus_root, progress=killer)
    assert killer.fired
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
    figures = result.plugin_figures["redis"]
    assert figures["hosts_lost"] == 1 and figures["remote_launches"] == 4
    assert not any(placed.values())  # the replacements run on the coordinator's machine
    assert outcomes[0][0] == -9
    # the dead host could not remove its spool: `cfn clean` finds it stale
    stale = [path for path, is_stale in find_runs(str(bus_root)) if is_stale]
    assert len(stale) == 1
    for path in stale:
        remove_tree(path)


def _netns_available() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    name = f"cfnprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: yields (namespace, our address)."""
    if not _netns_available():
        if os.environ.get("CFN_REQUIRE_NETNS") == "1":
            pytest.fail("ip netns is not available (CFN_REQUIRE_NETNS=1)")
        pytest.skip("ip netns is not available here (needs root with CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:6]
    ns, a, b = f"cfn{tag}", f"cfa{tag}", f"cfb{tag}"
    octet = 16 + os.getpid() % 200
    ours, theirs = f"10.251.{octet}.1", f"10.251.{octet}.2"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
        ["ip", "link", "set", b, "netns", ns],
        ["ip", "addr", "add", f"{ours}/30", "dev", a],
        ["ip", "link", "set", a, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{theirs}/30", "dev", b],
        ["ip", "netns", "exec", ns, "ip", "link", "set", b, "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield ns, ours
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_host_in_another_network_namespace_joins(no_leaks, netns, make_config, bus_root):
    ns, address = netns
    server = RedisServer(bind=address, password="netns-s3cret")  # off loopback Redis wants a password
    try:
        config = make_config(
            plugins=("redis",), redis={"url": server.url, "wait_hosts": 1, "local_agents": 0}, workload={"agents": 5}
        )
        result, placed, outcomes, _ = _remote_run(
            config, server.url, bus_root, prefix=("ip", "netns", "exec", ns)
        )
    finally:
        server.stop()
    assert result.ok and result.delivery_rate == 1.0
    assert all(placed.values())
    assert outcomes[0][0] == 0, outcomes[0][1]


def test_cfn_agent_errors_are_one_clear_line(redis_url):
    unreachable = subprocess.run(
        [sys.executable, "-m", "cfn_core", "agent", "--bus", "redis://:pw@127.0.0.1:1/0", "--wait", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert unreachable.returncode == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in unreachable.stderr and "pw" not in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    no_run = subprocess.run(
        [sys.executable, "-m", "cfn_core", "agent", "--bus", redis_url, "--run", "0000000000000000", "--wait", "0.2"],
        capture_output=True, text=True, timeout=60,
    )
    assert no_run.returncode == 2
    assert "found no run 0000000000000000" in no_run.stderr


class KillRemoteAgentOnCollect:
    def __init__(self):
        self.coord = self.hosts = None
        self.killed = None

    def __call__(self, phase, done, total):
        if phase == "collect" and self.killed is None:
            remote = [h for h in self.coord.ctx.agents.values() if h.remote is not None and h.pid and h.alive]
            if remote:
                os.kill(remote[0].pid, 9)  # on this machine we can: the host reports the death
                self.killed = remote[0].id


def test_remote_agents_fork_from_a_zygote_and_a_killed_one_is_replaced(no_leaks, redis_config, redis_url, bus_root):
    if "pool" not in installed():
        pytest.skip("cfn-pool is not installed")
    config = redis_config(
        plugins=("redis", "pool", "parallel"),
        redis={"wait_hosts": 1, "local_agents": 0},
        pool={"size": 0},
        workload={"agents": 4, "tasks": 12, "rounds": 2, "command": "sleep 0.3; cat", "payload_bytes": 8},
    )
    killer = KillRemoteAgentOnCollect()
    result, placed, outcomes, _ = _remote_run(config, redis_url, bus_root, progress=killer)
    assert killer.killed
    assert result.ok, [r.error for r in result.results.values() if not r.ok]
    assert result.delivery_rate == 1.0
    assert all(placed.values())  # the replacement went back to the same host
    assert result.rounds[0].retries >= 1
    (code, err), = outcomes
    assert code == 0, err
    assert "forked from a zygote" in err


def test_no_room_is_a_spawn_failure_not_a_crash(no_leaks, redis_config):
    config = redis_config(redis={"local_agents": 2}, workload={"agents": 4})
    with Coordinator(config) as coord:
        result = coord.run()
    (round_,) = result.rounds
    assert round_.agents == 2 and len(round_.spawn_failures) == 2
    assert result.delivery_rate == 1.0  # the tasks went to the two agents there are
    assert all(r.ok for r in result.results.values())
