"""The bus is private and carries data only.

* run directories are 0700 with unpredictable names; another user can neither
  read nor inject (tested as uid 65534 when we are root);
* an agent refuses a run directory that is a symlink, not ours, or readable by
  others; a symlink (or FIFO) planted at an inbox, its directory or a state
  file is refused instead of followed;
* messages are data only: a hostile message naming modules, commands or
  plugins makes no agent import or execute anything the configuration did not
  name, and a pickle on the bus is dead-lettered, never unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_handlers import fault_env, plugin_params  # noqa: E402,F401

from cfn_core import BusError, Coordinator, Message, hookimpl  # noqa: E402
from cfn_core.bus.shm import ShmBus, check_private_dir  # noqa: E402


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_run_directories_are_private_and_unpredictable(bus_root):
    buses = [ShmBus.create(str(bus_root)) for _ in range(20)]
    try:
        names = [b.run_dir.name for b in buses]
        assert len(set(names)) == 20
        for b in buses:
            assert re.fullmatch(r"cfn-[a-z0-9_]{8}", b.run_dir.name)
            assert _mode(b.run_dir) == 0o700
            for sub in ("cursor", "bell", "dead", "state", "count"):
                assert _mode(b.run_dir / sub) == 0o700
            assert _mode(b.run_dir / "owner.json") == 0o600
        bus = buses[0]
        bus.inbox_depth = 10
        bus.deliver("a1", "shard-1/a1", [b"{}\n"])  # a directory made on demand is private too
        assert _mode(bus.run_dir / "shard-1") == 0o700 and _mode(bus.run_dir / "shard-1" / "a1") == 0o600
        assert _mode(bus.run_dir / "count" / "shard-1") == 0o700
        assert _mode(bus.run_dir / "count" / "shard-1" / "a1") == 0o600
    finally:
        for b in buses:
            b.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_read_nor_inject(bus_root):
    bus = ShmBus.create(str(bus_root))
    try:
        bus.deliver("a1", "inbox/a1", [b'{"secret":1}\n'])
        os.chmod(bus_root, 0o755)  # the test's root dir is open; the run directory itself must not be
        probe = textwrap.dedent(
            f"""
            import os
            run = {str(bus.run_dir)!r}
            for what, action in [
                ("list", lambda: os.listdir(run)),
                ("read", lambda: open(run + "/inbox/a1", "rb").read()),
                ("inject", lambda: open(run + "/inbox/a1", "ab").write(b"{{}}\\n")),
                ("plant", lambda: os.symlink("/etc/passwd", run + "/inbox/a2")),
            ]:
                try:
                    action()
                    print(what, "ALLOWED")
                except PermissionError:
                    print(what, "denied")
            """
        )
        done = subprocess.run(
            ["/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable, "-c", probe],
            capture_output=True, text=True, timeout=60,
            user=65534, group=65534, extra_groups=[], cwd="/",
        )
        assert done.stdout.split() == ["list", "denied", "read", "denied", "inject", "denied", "plant", "denied"], (
            done.stdout + done.stderr
        )
        assert (bus.run_dir / "inbox" / "a1").read_bytes() == b'{"secret":1}\n'
    finally:
        os.chmod(bus_root, 0o700)
        bus.destroy()


def test_attach_refuses_unsafe_run_directories(bus_root, tmp_path):
    bus = ShmBus.create(str(bus_root))
    try:
        link = bus_root / "cfn-planted"
        link.symlink_to(bus.run_dir)
        with pytest.raises(BusError, match="not a plain directory"):
            ShmBus.attach(link)
        link.unlink()
        os.chmod(bus.run_dir, 0o755)
        with pytest.raises(BusError, match="has mode 755; cfn requires 0700"):
            ShmBus.attach(bus.run_dir)
        os.chmod(bus.run_dir, 0o700)
        if os.geteuid() == 0:
            os.chown(bus.run_dir, 65534, 65534)
            with pytest.raises(BusError, match=r"belongs to uid 65534, not to us \(uid 0\)"):
                ShmBus.attach(bus.run_dir)
            os.chown(bus.run_dir, 0, 0)
        with pytest.raises(BusError, match="does not exist"):
            check_private_dir(str(bus_root / "cfn-gone"))
        ShmBus.attach(bus.run_dir).close()  # and the real one is fine
    finally:
        bus.destroy()


@pytest.mark.parametrize("where", ["inbox file", "inbox directory", "fifo"])
def test_planted_link_at_an_inbox_is_refused_not_followed(bus_root, tmp_path, where):
    target = tmp_path / "victim"
    target.mkdir()
    (target / "a1").write_bytes(b"precious\n")
    bus = ShmBus.create(str(bus_root))
    try:
        if where == "inbox file":
            (bus.run_dir / "inbox").mkdir(mode=0o700)
            (bus.run_dir / "inbox" / "a1").symlink_to(target / "a1")
            expected = "a symlink or non-directory was planted"
        elif where == "inbox directory":
            (bus.run_dir / "inbox").symlink_to(target)
            expected = "a symlink or non-directory was planted"
        else:
            (bus.run_dir / "inbox").mkdir(mode=0o700)
            os.mkfifo(bus.run_dir / "inbox" / "a1", 0o600)
            expected = "not a regular file"
        with pytest.raises(BusError, match=expected):
            bus.deliver("a1", "inbox/a1", [b"{}\n"])
        reader = ShmBus.attach(bus.run_dir)
        try:
            with pytest.raises(BusError, match=expected):
                reader.read("a1", "inbox/a1")
        finally:
            reader.close()
        assert (target / "a1").read_bytes() == b"precious\n"
    finally:
        bus.destroy()


def test_planted_state_link_is_refused(bus_root, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    bus = ShmBus.create(str(bus_root))
    try:
        (bus.run_dir / "state" / "config").symlink_to(secret)
        with pytest.raises(BusError, match="planted"):
            bus.get_state("config")
    finally:
        bus.destroy()


def test_locations_and_ids_cannot_escape_the_run_directory(bus_root):
    bus = ShmBus.create(str(bus_root))
    try:
        for location in ("../x", "/etc/passwd", "inbox/../../x"):
            with pytest.raises(BusError, match="escapes the run directory"):
                bus.deliver("a1", location, [b"{}\n"])
        with pytest.raises(BusError, match="not a plain name"):
            bus.read("../a1", "inbox/a1")
    finally:
        bus.destroy()


# ---------------------------------------------------------------------- messages are data only


_EVIL = '''
import os
open(os.environ["CFN_EVIL_MARK"] + "/imported", "w").write("cfn_planted_evil was imported")
def boom(payload):
    open(os.environ["CFN_EVIL_MARK"] + "/called", "w").write("boom ran")
'''


class _Injector:
    """Writes hostile records straight into every agent's inbox as soon as it is ready."""

    def __init__(self, mark):
        self.mark = mark
        self.done = False

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        self.done = True
        number = ctx._round.number if ctx._round is not None else 1
        hostile_body = {
            "payload": {"key": "hostile"},
            "handler": "cfn_planted_evil:boom",
            "command": f"touch {self.mark}/command-ran",
            "plugins": ["cfn_planted_evil"],
            "plugin_modules": {"evil": "cfn_planted_evil"},
            "__import__": "cfn_planted_evil",
            "config": {"workload": {"handler": "cfn_planted_evil:boom"}},
        }
        for handle in [agent]:
            location = ctx.route(handle.id)
            records = [
                Message(id=f"evil.1.{i}", src="evil", dst=handle.id, kind="task", round=number,
                        task=f"evil-{handle.id}-{i}", body=hostile_body).encode()
                for i in range(2)
            ]
            records.append(b'{"id":"e","src":"e","dst":"x","kind":"exec","round":1,"body":"cfn_planted_evil"}\n')
            records.append(pickle.dumps(("os.system", f"touch {self.mark}/pickle-ran"), protocol=0).replace(b"\n", b" ") + b"\n")
            ctx.bus.deliver(handle.id, location, records)


@pytest.mark.parametrize("plugins", plugin_params())
def test_hostile_messages_make_no_agent_import_or_run_anything(make_config, fault_env, tmp_path, monkeypatch, no_leaks, plugins):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "cfn_planted_evil.py").write_text(_EVIL)
    mark = tmp_path / "marks"
    mark.mkdir()
    # the evil module is importable everywhere: only a message could make anyone import it
    monkeypatch.setenv("PYTHONPATH", os.environ["PYTHONPATH"] + os.pathsep + str(planted))
    monkeypatch.setenv("CFN_EVIL_MARK", str(mark))
    tables = {"workload": {"agents": 3, "handler": "test_faults_handlers:whoami"}}
    if "pool" in plugins:
        tables["pool"] = {"size": 3}
    injector = _Injector(mark)
    payloads = [{"key": f"k{i}", "handler": "cfn_planted_evil:boom", "command": f"touch {mark}/x"} for i in range(6)]
    with Coordinator(make_config(plugins=plugins, **tables), extra_plugins=[injector]) as coord:
        result = coord.run(payloads)
        dead = coord.ctx.bus.dead_letters()
    assert injector.done
    assert result.ok
    for r in result.results.values():
        assert r.value["planted"] == []
    assert sorted(os.listdir(mark)) == []  # nothing imported, called, executed or unpickled
    # the unknown kind and the pickle were dead-lettered with their reasons, per agent
    reasons = [d["reason"] for d in dead]
    assert sum("unknown kind 'exec'" in x for x in reasons) >= 3
    assert sum(x.startswith("not JSON") for x in reasons) >= 3
