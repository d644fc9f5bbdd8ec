"""The `cfn` command as a user runs it: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from cfn_core import Coordinator
from cfn_core.bus.shm import _proc_start_time
from cfn_core.config import load_config


@pytest.fixture
def cli(tmp_path, bus_root):
    """Run ``cfn ARGS`` in ``tmp_path`` with a private bus root and no CFN_* from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)

    def run(*args, extra_env=None, **kw):
        kw.setdefault("capture_output", True)
        return subprocess.run(
            [sys.executable, "-m", "cfn_core", *args],
            cwd=tmp_path,
            env={k: v for k, v in {**env, **(extra_env or {})}.items() if v is not None},
            text=True,
            timeout=120,
            **kw,
        )

    run.env = env
    return run


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, proc.stderr
    assert err.startswith("cfn")
    return err


def test_run_json_is_valid_json_on_stdout_and_stderr_stays_quiet(cli, no_leaks):
    proc = cli("run", "--agents", "3", "--payload-bytes", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no progress
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["exit_code"] == 0
    assert out["agents"] == 3 and out["tasks"] == 3
    assert out["messages_planned"] == out["messages_delivered"] == 6
    assert out["delivery_rate"] == 1.0
    assert set(out["phases"]) == {"spawn", "ready", "distribute", "execute", "collect", "shutdown"}
    assert out["plugins"] == [] and out["bus"] == "shm" and out["topology"] == "star"
    assert "results" not in out["rounds"][0]


def test_run_json_results_lists_every_task(cli):
    proc = cli("run", "--agents", "2", "--rounds", "2", "--json", "--results", "--set", "workload.payload_bytes=5")
    out = json.loads(proc.stdout)
    assert [len(r["results"]) for r in out["rounds"]] == [2, 2]
    task = out["rounds"][1]["results"]["r2-t000001"]
    assert task["ok"] is True and task["value"] == "xxxxx" and task["agent"].startswith("agent-")


def test_run_text_summary(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("[workload]\nagents = 2\ntopology = 'mesh'\nmessages_per_agent = 3\n")
    proc = cli("run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cfn run: OK  plugins=baseline  bus=shm  topology=mesh")
    assert "agents 2  tasks 2  messages 10/10 delivered (100.00%)  failed 0" in lines[1]
    assert "round 1:" in lines[2] and "spawn" in lines[2] and "shutdown" in lines[2]
    assert lines[-1].startswith("  total ")


def test_run_exit_1_when_a_task_fails(cli):
    # json:loads raises on the default payload ("xxx..."): every task fails, the run completes
    proc = cli("run", "--agents", "2", "--handler", "json:loads")
    assert proc.returncode == 1
    assert proc.stdout.startswith("cfn run: FAILED")
    assert "failed 2" in proc.stdout
    assert "error: JSONDecodeError: Expecting value" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_run_exit_2_on_bad_configuration(cli):
    err = one_line_error(cli("run", "--agents", "zero"))
    assert err.startswith("cfn: error: command line workload.agents")
    assert err.endswith("[workload] agents = 'zero': must be an integer from 1 to 100000")


def test_progress_is_drawn_only_on_a_terminal(cli):
    master, slave = pty.openpty()
    try:
        proc = cli("run", "--agents", "2", "--json", stderr=slave, stdout=subprocess.PIPE, capture_output=False)
        os.close(slave)
        slave = None
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["ok"] is True
    assert b"spawn" in drawn and b"2/2" in drawn  # the live line went to the terminal, not stdout


# ---------------------------------------------------------------------- cfn init


def test_init_writes_a_config_that_loads_as_the_defaults(cli, tmp_path):
    proc = cli("init")
    assert proc.returncode == 0 and proc.stdout.strip() == "wrote cfn.toml"
    text = (tmp_path / "cfn.toml").read_text()
    assert text.startswith("# cfn configuration.")
    assert "[workload]" in text and "[bus]" in text and "[run]" in text
    loaded = load_config(tmp_path / "cfn.toml", env={}).to_dict()
    # the one difference: handlers and commands are found next to the file
    assert loaded["workload"].pop("directory") == str(tmp_path.resolve())
    defaults = load_config(None, env={}, discover=False).to_dict()
    assert defaults["workload"].pop("directory") == ""
    assert loaded == defaults


def test_init_refuses_to_overwrite_without_force(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("# mine\n")
    err = one_line_error(cli("init"))
    assert err == "cfn: error: cfn.toml already exists; use --force to overwrite it"
    assert (tmp_path / "cfn.toml").read_text() == "# mine\n"
    assert cli("init", "--force").returncode == 0
    assert (tmp_path / "cfn.toml").read_text().startswith("# cfn configuration.")


def test_init_to_another_path(cli, tmp_path):
    proc = cli("init", "conf/example.toml")
    assert proc.returncode == 0
    assert (tmp_path / "conf" / "example.toml").is_file()
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        err = one_line_error(cli("init", "ro/cfn.toml"))
        assert err == "cfn: error: cannot write ro/cfn.toml: Permission denied"


# ---------------------------------------------------------------------- cfn clean


def write_run(root, name, owner=None, age=None):
    d = root / name
    d.mkdir(mode=0o700)
    (d / "inbox").mkdir()
    (d / "inbox" / "agent-0001").write_bytes(b"{}\n")
    if owner is not None:
        (d / "owner.json").write_text(json.dumps(owner))
    if age is not None:
        t = time.time() - age
        os.utime(d, (t, t))
    return d


def test_clean_removes_only_stale_run_directories(cli, bus_root, make_config, no_leaks):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_dead = write_run(bus_root, "cfn-deadpid", {"pid": dead.pid, "start": "1", "created": 0})
    stale_reused = write_run(bus_root, "cfn-reused", {"pid": os.getpid(), "start": "1", "created": 0})  # pid reused
    stale_old = write_run(bus_root, "cfn-noowner-old", age=3600)
    fresh = write_run(bus_root, "cfn-noowner-fresh")  # being created right now
    other = bus_root / "not-cfn"
    other.mkdir()
    config = make_config(workload={"agents": 1})
    with Coordinator(config) as coord:  # a live run
        live = coord.ctx.bus.run_dir
        dry = cli("clean", "--root", str(bus_root), "--dry-run")
        assert dry.returncode == 0
        assert "3 stale run(s) found, 2 live run(s) kept" in dry.stdout
        assert stale_dead.exists()
        proc = cli("clean", "--root", str(bus_root))
        assert proc.returncode == 0, proc.stderr
        assert sorted(line for line in proc.stdout.splitlines() if line.startswith("removed")) == sorted(
            f"removed {p}" for p in (stale_dead, stale_reused, stale_old)
        )
        assert proc.stdout.splitlines()[-1] == "3 stale run(s) removed, 2 live run(s) kept"
        assert live.is_dir() and (live / "owner.json").is_file()
        result = coord.run()  # the live run is intact
    assert result.ok
    assert not stale_dead.exists() and not stale_reused.exists() and not stale_old.exists()
    assert fresh.is_dir() and other.is_dir()
    shutil.rmtree(fresh)  # test data, not a leak: the fixture wants the root empty
    other.rmdir()


def test_clean_with_nothing_to_do(cli, bus_root):
    proc = cli("clean", "--root", str(bus_root))
    assert proc.returncode == 0
    assert proc.stdout.strip() == "0 stale run(s) removed, 0 live run(s) kept"


def test_owner_file_records_pid_and_start_time(make_config):
    with Coordinator(make_config(workload={"agents": 1})) as coord:
        owner = json.loads((coord.ctx.bus.run_dir / "owner.json").read_text())
    assert owner["pid"] == os.getpid()
    assert owner["start"] == _proc_start_time(os.getpid())


# ---------------------------------------------------------------------- metrics


KERNEL_METRICS = (
    "cfn_coordination_seconds",
    "cfn_phase_seconds",
    "cfn_delivery_rate",
    "cfn_messages_sent_total",
    "cfn_messages_delivered_total",
    "cfn_messages_dead_lettered_total",
    "cfn_agent_spawn_seconds",
    "cfn_agents",
    "cfn_agent_exits_total",
    "cfn_task_retries_total",
    "cfn_task_failures_total",
    "cfn_task_latency_seconds",
)


def samples(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_file_is_prometheus_text_with_the_kernel_names(cli, tmp_path):
    proc = cli("run", "--agents", "3", "--metrics-file", "metrics.prom", "--json")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "metrics.prom").read_text()
    for name in KERNEL_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    s = samples(text)
    out = json.loads(proc.stdout)
    assert s["cfn_messages_sent_total"] == out["messages_sent"] == 6
    assert s["cfn_messages_delivered_total"] == out["messages_delivered"] == 6
    assert s["cfn_delivery_rate"] == 1.0
    assert s["cfn_coordination_seconds_count"] == 1
    assert s['cfn_phase_seconds_count{phase="spawn"}'] == 1
    assert s["cfn_agent_spawn_seconds_count"] == 3
    assert s['cfn_agent_exits_total{reason="stopped"}'] == 3
    assert s["cfn_agents"] == 0


PROBE = textwrap.dedent(
    '''
    """A handler that scrapes the coordinator's /metrics while the run is going."""
    import os
    import urllib.request


    def scrape(payload):
        port = os.environ["CFN_RUN_METRICS_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            return resp.read().decode()
    '''
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_port_serves_during_the_run(cli, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    port = free_port()
    proc = cli(
        "run", "--agents", "3", "--handler", "probe:scrape", "--json", "--results",
        extra_env={"CFN_RUN_METRICS_PORT": str(port)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    scraped = [r["value"] for r in out["rounds"][0]["results"].values()]
    assert len(scraped) == 3
    for text in scraped:
        s = samples(text)
        assert s["cfn_agents"] == 3  # mid-run: every agent alive
        assert s["cfn_agent_spawn_seconds_count"] == 3
        assert s["cfn_messages_sent_total"] >= 3  # the tasks are out
        assert "cfn_coordination_seconds_count 0.0" in text  # the round is not over
    # and the port is closed once the run ended
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_clean_uses_the_configured_bus_root(cli, tmp_path, bus_root):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = write_run(bus_root, "cfn-stale1", {"pid": dead.pid, "start": "1", "created": 0})
    # CFN_BUS_ROOT (set by the fixture) names the root, as [bus] root in cfn.toml would
    proc = cli("clean")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"removed {stale}", "1 stale run(s) removed, 0 live run(s) kept"]
    stale = write_run(bus_root, "cfn-stale2", {"pid": dead.pid, "start": "1", "created": 0})
    (tmp_path / "clean.toml").write_text(f'[bus]\nroot = "{bus_root}"\n')
    proc = cli("clean", "--config", "clean.toml", extra_env={"CFN_BUS_ROOT": None})
    assert proc.stdout.splitlines() == [f"removed {stale}", "1 stale run(s) removed, 0 live run(s) kept"]


def test_version(cli):
    import importlib.metadata as md

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"cfn {md.version('cfn-core')}"


def test_usage_errors_are_one_line(cli):
    for args, expected in [
        (("run", "--agents"), "cfn run: error: argument --agents: expected one argument (see 'cfn run --help')"),
        (("run", "--bogus"), "cfn: error: unrecognized arguments: --bogus (see 'cfn --help')"),
        ((), "cfn: error: the following arguments are required: command (see 'cfn --help')"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2
        assert proc.stderr.strip() == expected


def test_handler_output_never_corrupts_json_stdout(cli, tmp_path):
    (tmp_path / "chatty.py").write_text("def talk(payload):\n    print('hello from the handler', flush=True)\n    return 1\n")
    proc = cli("run", "--agents", "2", "--handler", "chatty:talk", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert proc.stderr.count("hello from the handler") == 2  # it went to stderr instead


def test_kernel_commands_do_not_import_the_plugins_commands(tmp_path):
    """`cfn run` needs no plugin's subcommands: building them imported every installed plugin
    (a Redis client among them), ~0.1 s of every run.  `cfn --help` still lists them."""
    probe = textwrap.dedent(
        """
        import sys
        from cfn_core import cli
        try:
            cli.main(sys.argv[1:])
        except SystemExit:
            pass
        print("IMPORTED", sorted(m for m in sys.modules if m in ("cfn_core.bench.cli", "cfn_redis", "cfn_batch")))
        """
    )
    def imported(*args):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED")]
        assert line, (proc.stdout, proc.stderr)
        return line[0], proc.stdout

    assert imported("run", "--help")[0] == "IMPORTED []"
    assert imported("plugins", "--help")[0] == "IMPORTED []"
    listed, out = imported("--help")
    assert "cfn_core.bench.cli" in listed and "bench" in out
