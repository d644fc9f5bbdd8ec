"""Resources running out: a full /dev/shm, a file size limit, too few file descriptors,
and a 100-round soak that must not grow.

The full bus is a real 1 MiB tmpfs mounted by the test (root only) and, for
everyone, ``RLIMIT_FSIZE`` in a child process: the write fails half way, the
inbox is truncated back, the sender gets a clear BusError, and a reader finds
exactly the records that were reported sent, each whole.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import fault_env, installed_optimizations  # noqa: E402,F401

from cfn_core import BusError, Coordinator  # noqa: E402
from cfn_core.bus.shm import ShmBus  # noqa: E402

CFN = os.path.join(os.path.dirname(sys.executable), "cfn")


@pytest.fixture
def small_tmpfs():
    """A 1 MiB tmpfs (needs root and mount(2)); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="cfnfull-", dir="/tmp"))  # short: doorbell socket paths are limited
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
        assert not list(mnt.iterdir()), f"left behind on the small tmpfs: {os.listdir(mnt)}"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        mnt.rmdir()


def _fill(bus, record_size):
    """Deliver numbered records until the bus refuses one; return the ones reported sent and the error."""
    sent = []
    for i in range(100_000):
        record = json.dumps({"n": i, "pad": "x" * record_size}).encode() + b"\n"
        try:
            bus.deliver("a1", "inbox/a1", [record])
        except BusError as exc:
            return sent, exc
        sent.append(record)
    raise AssertionError("the bus never filled up")


def _check_inbox(bus, sent):
    """The reader sees exactly the records reported sent, whole and in order."""
    reader = ShmBus.attach(bus.run_dir)
    try:
        got = [raw for raw, _ in reader.read("a1", "inbox/a1")]
    finally:
        reader.close()
    assert got == sent
    inbox = bus.run_dir / "inbox" / "a1"
    data = inbox.read_bytes()
    assert data.endswith(b"\n") and len(data) == sum(map(len, sent))


@pytest.mark.parametrize("batch", [1, 7], ids=["single", "batched"])
def test_full_tmpfs_refuses_whole_messages_and_loses_none(small_tmpfs, no_leaks, batch):
    bus = ShmBus.create(str(small_tmpfs), inbox_depth=0)
    try:
        sent = []
        error = None
        for i in range(10_000):
            records = [json.dumps({"n": i, "k": k, "pad": "y" * 3000}).encode() + b"\n" for k in range(batch)]
            try:
                bus.deliver("a1", "inbox/a1", records)
            except BusError as exc:
                error = exc
                break
            sent.extend(records)
        assert error is not None
        assert "is full" in str(error) and "No space left on device" in str(error)
        assert f"{batch} message(s) to a1 were not written" in str(error)
        assert len(sent) > 100
        _check_inbox(bus, sent)
        print(f"\nfull tmpfs (batch {batch}): {len(sent)} records ({sum(map(len, sent))} bytes) sent, then: {error}")
        # after the refusal the bus still works for what fits
        bus.deliver("a1", "inbox/a1", [b'{"small":1}\n'])
        _check_inbox(bus, sent + [b'{"small":1}\n'])
    finally:
        bus.destroy()


def test_file_size_limit_refuses_whole_messages(bus_root, tmp_path):
    """RLIMIT_FSIZE in a child process: the write fails with EFBIG half way through a record."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_faults_resources import _fill, _check_inbox
        from cfn_core.bus.shm import ShmBus
        bus = ShmBus.create({str(bus_root)!r})
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
            sent, exc = _fill(bus, 999)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            _check_inbox(bus, sent)
            print(json.dumps({{"sent": len(sent), "bytes": sum(map(len, sent)), "error": str(exc)}}))
        finally:
            bus.destroy()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    # every record that fitted whole was sent, not one more
    assert 100_000 - 1020 < out["bytes"] <= 100_000 and out["sent"] > 90
    print(f"\nRLIMIT_FSIZE 100000: {out['sent']} records ({out['bytes']} bytes) sent, then: {out['error']}")
    assert "is full (File too large)" in out["error"] and "1 message(s) to a1 were not written" in out["error"]


def test_coordination_on_a_full_bus_reports_instead_of_pretending(small_tmpfs, make_config, fault_env, no_leaks):
    """Results that do not fit: each task is either answered whole or failed with the reason."""
    config = make_config(
        workload={"agents": 4, "payload_bytes": 60_000, "handler": "test_faults_handlers:grow"},
        bus={"root": str(small_tmpfs), "max_message_bytes": 400_000},
    )
    payload = "x" * 60_000 * 4
    with Coordinator(config) as coord:
        result = coord.run()
    full = [r for r in result.results.values() if not r.ok]
    whole = [r for r in result.results.values() if r.ok]
    assert full, "the tmpfs was expected to fill up"
    assert all(r.value == payload for r in whole)
    for r in full:
        assert r.value is None and "is full" in r.error, r.error
    (round_,) = result.rounds
    # a task counts as delivered only through a result that arrived; the failure is reported
    assert round_.delivered <= round_.planned and result.failed == len(full)
    print(f"\nfull tmpfs coordination: {len(whole)} results whole, {len(full)} failed: {full[0].error[:90]!r}")


def test_coordinator_send_on_a_full_bus_is_a_clear_error(small_tmpfs, make_config, no_leaks):
    config = make_config(
        workload={"agents": 2, "tasks": 16, "payload_bytes": 100_000},
        bus={"root": str(small_tmpfs), "max_message_bytes": 200_000},
    )
    with pytest.raises(BusError, match=r"is full \(No space left on device\).*free space in the bus root"):
        with Coordinator(config) as coord:
            coord.run()


# ---------------------------------------------------------------------- file descriptors


def _limit_nofile(soft, hard):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def test_fd_limit_too_low_is_a_clear_error_before_any_agent(bus_root, tmp_path):
    done = subprocess.run(
        [CFN, "run", "--agents", "300", "--set", f"bus.root={bus_root}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=_limit_nofile(128, 128),
    )
    assert done.returncode == 2, done.stderr
    assert "300 agents needs about" in done.stderr and "open files but this process may only open 128" in done.stderr
    assert "ulimit -Hn" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(bus_root.iterdir())  # refused before the bus or any agent existed


def test_low_soft_fd_limit_is_raised(bus_root, tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("hard limit too low to test raising the soft one")
    done = subprocess.run(
        [CFN, "run", "--agents", "30", "--set", f"bus.root={bus_root}", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_limit_nofile(64, 4096),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["delivery_rate"] == 1.0


# ---------------------------------------------------------------------- soak


def _open_files(me) -> int:
    """This process's descriptors, not counting directories: the bus keeps a directory's
    descriptor once it first uses it (a bounded cache, opened when first needed, e.g. the
    state directory at the first tick that falls inside a round), which is no leak."""
    count = 0
    for fd in os.listdir(f"/proc/{me.pid}/fd"):
        try:
            if not os.path.isdir(f"/proc/{me.pid}/fd/{fd}"):
                count += 1
        except OSError:  # closed meanwhile
            pass
    return count


def _figures(me):
    procs = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    return {
        "fds": _open_files(me),
        "processes": len(procs),
        "rss_mb": me.memory_info().rss / 2**20,
        "agents_rss_mb": sum(p.memory_info().rss for p in procs) / 2**20,
    }


@pytest.mark.skipif("pool" not in installed_optimizations(), reason="needs cfn-pool")
def test_soak_100_rounds_with_the_pool_stays_flat(make_config, no_leaks):
    plugins = tuple(installed_optimizations())
    config = make_config(plugins=plugins, workload={"agents": 10, "tasks": 30}, pool={"size": 10})
    me = psutil.Process()
    seen = {}
    with Coordinator(config) as coord:
        for i in range(1, 101):
            result = coord.run(rounds=1)
            assert result.ok and result.delivery_rate == 1.0, result.rounds[0].to_dict()
            if i in (1, 10, 50, 100):
                seen[i] = _figures(me)
    print("\nsoak figures by round:", json.dumps({k: {n: round(v, 1) for n, v in f.items()} for k, f in seen.items()}))
    assert seen[100]["fds"] <= seen[10]["fds"]
    assert seen[100]["processes"] == seen[10]["processes"] == seen[1]["processes"]
    assert seen[100]["rss_mb"] - seen[10]["rss_mb"] < 8.0
    assert seen[100]["agents_rss_mb"] - seen[10]["agents_rss_mb"] < 4.0 * seen[10]["processes"]
