"""Bad input, one test each: the error message is checked, not just the exit code.

Configuration mistakes exit 2 with one line naming the file/key/value and what
is allowed; mistakes inside a run (a handler that raises, a command that fails,
garbage on the bus) fail that task or that record, never the agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cfn_core import COORDINATOR_ID, Coordinator, hookimpl
from cfn_core.bus.shm import ShmBus
from cfn_core.errors import BusError, ConfigError, MessageTooLarge
from cfn_core.messages import check_agent_id


@pytest.fixture
def cli(tmp_path, bus_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)

    def run(*args, extra_env=None):
        return subprocess.run(
            [sys.executable, "-m", "cfn_core", *args],
            cwd=tmp_path,
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def error_line(proc) -> str:
    """The one line a usage/config error prints; asserts exit 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


HANDLERS = textwrap.dedent(
    '''
    """Handlers for the bad-input tests."""
    import os


    def picky(payload):
        if payload == "boom":
            raise ValueError("boom is not allowed")
        return [payload, os.getpid()]


    def huge(payload):
        return "y" * 3_000_000


    def broken_import_target(payload):
        return payload
    '''
)


@pytest.fixture
def handlers(tmp_path, monkeypatch):
    """A handler module importable by the coordinator and by its agents."""
    (tmp_path / "badinput_handlers.py").write_text(HANDLERS)
    (tmp_path / "raises_on_import.py").write_text("raise ImportError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    yield tmp_path
    for mod in ("badinput_handlers", "raises_on_import"):
        sys.modules.pop(mod, None)


# ---------------------------------------------------------------------- cfn.toml


def test_malformed_toml_names_file_and_line(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text('plugins = []\n\n[workload]\nagents = 10\ntopology = star\n')
    line = error_line(cli("run"))
    assert f"{tmp_path / 'cfn.toml'}: invalid TOML" in line
    assert "line 5" in line


def test_unknown_key_is_named_with_valid_keys_and_did_you_mean(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("[workload]\nagnets = 10\n")
    line = error_line(cli("run"))
    assert f"{tmp_path / 'cfn.toml'}: unknown key 'agnets' in [workload] (did you mean 'agents'?)" in line
    assert "valid keys: agents, rounds, tasks, topology" in line


def test_unknown_table_is_named(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("[wrokload]\nagents = 10\n")
    line = error_line(cli("run"))
    assert "unknown table or key 'wrokload' (did you mean 'workload'?)" in line
    assert "[workload]" in line and "[bus]" in line and "[run]" in line


def test_wrong_type_names_key_value_and_allowed(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text('[workload]\nagents = "many"\n')
    line = error_line(cli("run"))
    assert line.endswith("[workload] agents = 'many': must be an integer from 1 to 100000")
    assert str(tmp_path / "cfn.toml") in line


def test_out_of_range_names_the_range(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("[workload]\ntimeout = 0\n")
    line = error_line(cli("run"))
    assert line.endswith("[workload] timeout = 0: must be a number from 0.001 to 86400.0")


def test_choice_lists_the_choices(cli):
    line = error_line(cli("run", "--topology", "rnig"))
    assert line.endswith("[workload] topology = 'rnig': must be one of star, mesh")


def test_bad_environment_value_names_the_variable(cli):
    line = error_line(cli("run", extra_env={"CFN_AGENTS": "-3"}))
    assert "environment variable CFN_AGENTS" in line
    assert "[workload] agents = '-3': must be an integer from 1 to 100000" in line


def test_missing_config_file(cli):
    assert error_line(cli("run", "--config", "nope.toml")) == "cfn: error: --config nope.toml: no such file"


def test_table_that_is_not_a_table(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("workload = 5\n")
    assert "'workload' must be a table ([workload]), not int" in error_line(cli("run"))


def test_plugins_that_are_not_a_list(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text("plugins = 5\n")
    assert "plugins = 5: must be a list of plugin names" in error_line(cli("run"))


# ---------------------------------------------------------------------- plugins and handlers


def test_unknown_plugin_lists_the_installed_ones(cli):
    line = error_line(cli("run", "--plugins", "zzqx"))
    assert "unknown plugin 'zzqx'" in line
    assert "installed plugins:" in line


def test_handler_module_that_cannot_be_imported(cli):
    line = error_line(cli("run", "--handler", "no_such_module_xyz:run"))
    assert line == (
        "cfn: error: [workload] handler = 'no_such_module_xyz:run': cannot import module 'no_such_module_xyz': "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )


def test_handler_module_that_raises_on_import(cli, handlers):
    line = error_line(cli("run", "--handler", "raises_on_import:run"))
    assert "cannot import module 'raises_on_import': ImportError: needs a GPU" in line


def test_handler_function_that_does_not_exist(cli):
    line = error_line(cli("run", "--handler", "json:lods"))
    assert line == "cfn: error: [workload] handler = 'json:lods': module 'json' has no function 'lods'"


def test_handler_that_is_not_module_colon_function(cli):
    line = error_line(cli("run", "--handler", "json.loads"))
    assert "[workload] handler = 'json.loads': must be 'module:function'" in line


def test_handler_that_raises_fails_its_task_and_the_agent_lives_on(make_config, handlers, no_leaks):
    config = make_config(workload={"agents": 1, "handler": "badinput_handlers:picky"})
    with Coordinator(config) as coord:
        result = coord.run(["a", "boom", "b", "c"])
        incarnations = [h.incarnation for h in coord.ctx.agents.values()]
    results = result.rounds[0].results
    boom = results["r1-t000001"]
    assert boom.ok is False and boom.value is None
    assert boom.error == "ValueError: boom is not allowed"
    assert boom.answered is True  # the agent itself reported it
    later = [results[f"r1-t00000{i}"] for i in (2, 3)]
    assert all(r.ok for r in later)
    assert len({tuple(r.value)[1] for r in [results["r1-t000000"], *later]}) == 1  # one agent process did all
    assert incarnations == [1] and result.rounds[0].retries == 0
    assert result.failed == 1 and result.exit_code == 1
    assert result.delivery_rate == 1.0  # the failure travelled back: nothing was lost


def test_handler_that_raises_exits_1_from_the_cli(cli, handlers):
    proc = cli("run", "--agents", "2", "--handler", "badinput_handlers:huge", "--json")
    assert proc.returncode == 1
    import json

    out = json.loads(proc.stdout)
    assert out["failed"] == 2 and out["exit_code"] == 1
    assert any("result not sent" in e and "max_message_bytes" in e for e in out["rounds"][0]["errors"])


def test_command_that_exits_nonzero(make_config, no_leaks):
    config = make_config(workload={"agents": 2, "command": "cat >/dev/null; echo 'step one' >&2; echo 'model not found' >&2; exit 3"})
    with Coordinator(config) as coord:
        result = coord.run(["p1", "p2", "p3"])
    assert result.failed == 3
    for r in result.results.values():
        assert r.ok is False
        assert r.error == "command exited with status 3: model not found"
        assert r.stderr == "step one\nmodel not found\n"


def test_command_result_is_its_stdout(make_config, no_leaks):
    config = make_config(workload={"agents": 1, "command": "tr a-z A-Z"})
    with Coordinator(config) as coord:
        result = coord.run(["hello", {"k": "v"}])
    assert [r.value for r in result.results.values()] == ["HELLO", '{"K": "V"}']


def test_command_that_does_not_exist_from_the_cli(cli):
    proc = cli("run", "--agents", "1", "--command", "no-such-command-xyz")
    assert proc.returncode == 1
    assert "error: command exited with status 127:" in proc.stdout
    assert "no-such-command-xyz" in proc.stdout and "not found" in proc.stdout


# ---------------------------------------------------------------------- the bus


class Garbage:
    """Writes malformed records into every agent's inbox (and the coordinator's) mid-run."""

    name = "garbage"
    RECORDS = [b"\x00\x01 not json\n", b'{"id": 7, "kind": "task"}\n', b'{"id":"x","src":"y","dst":"z","kind":"exec","round":0}\n']

    @hookimpl
    def cfn_agent_started(self, ctx, agent):
        ctx.bus.deliver(agent.id, ctx.route(agent.id), list(self.RECORDS))
        ctx.bus.deliver(COORDINATOR_ID, ctx.route(COORDINATOR_ID), [b"[1, 2, 3]\n"])


def test_malformed_bytes_in_inboxes_are_dead_lettered_and_counted(make_config, no_leaks):
    config = make_config(workload={"agents": 3})
    with Coordinator(config, extra_plugins=[Garbage()]) as coord:
        result = coord.run(["a", "b", "c", "d", "e", "f"])
        bus = coord.ctx.bus
        dead = bus.dead_letters()
        dead_metric = coord.ctx.metrics.registry.get_sample_value("cfn_messages_dead_lettered_total")
        incarnations = {h.incarnation for h in coord.ctx.agents.values()}
    assert result.ok and result.delivery_rate == 1.0  # the real messages all arrived
    assert sorted(r.value for r in result.results.values()) == list("abcdef")
    assert result.rounds[0].dead_lettered == 3 * 3 + 3
    assert dead_metric == 12
    assert incarnations == {1}  # no agent died of it
    by_agent = {}
    for d in dead:
        by_agent.setdefault(d["agent"], []).append(d["reason"])
    assert sorted(by_agent) == [COORDINATOR_ID, "agent-0001", "agent-0002", "agent-0003"]
    assert by_agent[COORDINATOR_ID] == ["not a JSON object"] * 3
    assert by_agent["agent-0001"][0].startswith("not JSON")
    assert by_agent["agent-0001"][1] == "field 'id' missing or not str"
    assert by_agent["agent-0001"][2] == "unknown kind 'exec'"


def test_oversized_payload_in_the_configuration(cli):
    line = error_line(cli("run", "--payload-bytes", "2000000"))
    assert "[workload] payload_bytes = 2000000 does not fit in a message: [bus] max_message_bytes = 1048576" in line


def test_oversized_task_payload_from_python(make_config, no_leaks):
    config = make_config(workload={"agents": 1}, bus={"max_message_bytes": 4096})
    with Coordinator(config) as coord:
        with pytest.raises(MessageTooLarge, match=r"is \d+ bytes; bus.max_message_bytes allows 4096"):
            coord.run(["z" * 10_000])


def test_oversized_result_becomes_an_error_result(make_config, handlers, no_leaks):
    config = make_config(workload={"agents": 1, "handler": "badinput_handlers:huge"})
    with Coordinator(config) as coord:
        result = coord.run(["a", "b"])
    for r in result.results.values():
        assert r.ok is False and r.answered
        assert r.error.startswith("result not sent: message ") and "bus.max_message_bytes allows 1048576" in r.error
    assert result.delivery_rate == 1.0


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "..", "/abs", "a/b", "", ".hidden", "x" * 65, "a\nb", "a b"])
def test_agent_id_with_path_traversal_is_refused(bad):
    with pytest.raises(ConfigError) as info:
        check_agent_id(bad)
    assert f"agent id {bad!r} is not allowed" in str(info.value)
    assert "without '..'" in str(info.value)


def test_agent_ids_that_are_fine():
    for good in ("agent-0001", "a", "A.b_c-9", "x" * 64):
        assert check_agent_id(good) == good


def test_traversal_is_refused_by_the_coordinator_and_the_bus(make_config, bus_root, no_leaks):
    with Coordinator(make_config(workload={"agents": 1})) as coord:
        with pytest.raises(ConfigError, match=r"agent id '\.\./escape' is not allowed"):
            coord.ctx.launch("../escape")
        with pytest.raises(ConfigError, match="is not allowed"):
            coord.ctx.bus.put_state("../../x", b"1")
        with pytest.raises(BusError, match="escapes the run directory"):
            coord.ctx.bus.deliver("x", "../elsewhere", [b"{}\n"])
    assert sorted(p.name for p in bus_root.iterdir()) == []


def test_reader_side_refuses_a_traversing_location(bus_root):
    bus = ShmBus.create(str(bus_root))
    try:
        with pytest.raises(BusError, match="escapes the run directory"):
            bus.read("a1", "inbox/../../a1")
    finally:
        bus.destroy()


# ---------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("workload.agents", "--set 'workload.agents': use TABLE.KEY=VALUE, e.g. --set pool.size=50"),
        ("agents=5", "--set 'agents=5': use TABLE.KEY=VALUE, e.g. --set pool.size=50"),
        ("wrkload.agents=5", "command line: unknown setting 'wrkload.agents' (did you mean 'workload'?)"),
        ("workload.agnets=5", "unknown key 'agnets' in [workload] (did you mean 'agents'?); valid keys: agents,"),
        ("workload.agents=five", "[workload] agents = 'five': must be an integer from 1 to 100000"),
        ("run.strict=perhaps", "[run] strict = 'perhaps': must be true or false"),
    ],
)
def test_set_misuse(cli, arg, expected):
    line = error_line(cli("run", "--set", arg))
    assert expected in line


def test_set_works(cli):
    proc = cli("run", "--set", "workload.agents=2", "--set", "workload.payload_bytes=3", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout)["agents"] == 2


def test_metrics_file_in_a_missing_directory_is_refused_before_the_run(cli):
    line = error_line(cli("run", "--metrics-file", "no/such/dir/m.prom"))
    # a relative path is resolved against the current directory and named in full
    assert "[run] metrics_file = '" in line and "/no/such/dir/m.prom': directory" in line and "does not exist" in line


def test_metrics_port_in_use(cli, bus_root):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = error_line(cli("run", "--agents", "1", "--metrics-port", str(port)))
    assert f"[run] metrics_port = {port}: cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in line
    assert list(bus_root.iterdir()) == []  # the run directory it had opened is gone


def test_mesh_needs_two_agents(cli):
    line = error_line(cli("run", "--agents", "1", "--topology", "mesh", "--messages-per-agent", "2"))
    assert "topology = 'mesh' with messages_per_agent > 0 needs agents >= 2" in line


def test_agents_over_max_agents(cli):
    line = error_line(cli("run", "--agents", "50", "--set", "run.max_agents=10"))
    assert "[workload] agents = 50 exceeds [run] max_agents = 10" in line


def test_handler_returning_something_that_is_not_json(make_config, no_leaks):
    # builtins:set turns the payload into a set, which JSON cannot carry
    config = make_config(workload={"agents": 1, "handler": "builtins:set"})
    with Coordinator(config) as coord:
        result = coord.run(["ab", "cd"])
        incarnations = [h.incarnation for h in coord.ctx.agents.values()]
    assert [r.error for r in result.results.values()] == [
        "handler returned a value that is not JSON: Type is not JSON serializable: set"
    ] * 2
    assert incarnations == [1] and result.rounds[0].retries == 0  # the agent did not crash
    assert result.delivery_rate == 1.0


def test_task_payload_that_is_not_json_is_refused_before_the_run(make_config, no_leaks):
    config = make_config(workload={"agents": 1})
    with Coordinator(config) as coord:
        with pytest.raises(ConfigError, match=r"task r1-t000001: payload is not JSON: Type is not JSON serializable: set"):
            coord.run(["fine", {1, 2}])
        assert coord.ctx.agents == {}  # refused before any agent started


def test_dead_letters_are_counted_once_per_round(make_config, no_leaks):
    config = make_config(workload={"agents": 2, "rounds": 3})
    with Coordinator(config, extra_plugins=[Garbage()]) as coord:
        result = coord.run()
        dead_metric = coord.ctx.metrics.registry.get_sample_value("cfn_messages_dead_lettered_total")
        on_the_bus = coord.ctx.bus.dead_letter_count()
    # the baseline starts two fresh agents each round: 2 x (3 + 1) garbage records per round
    assert [r.dead_lettered for r in result.rounds] == [8, 8, 8]
    assert result.to_dict()["dead_lettered"] == 24 == on_the_bus == dead_metric


def test_agents_that_cannot_start_are_reported_with_the_reason(make_config, tmp_path, monkeypatch, no_leaks):
    # importable here (sys.path), not in the agents (no PYTHONPATH): every agent exits before ready
    (tmp_path / "coordinator_only.py").write_text("def f(p):\n    return p\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(workload={"agents": 2, "handler": "coordinator_only:f"})
    with Coordinator(config) as coord:
        result = coord.run()
    sys.modules.pop("coordinator_only", None)
    r = result.rounds[0]
    assert r.agents == 0 and result.failed == 2
    assert r.spawn_failures == {
        "agent-0001": "exited with status 3 before it was ready",
        "agent-0002": "exited with status 3 before it was ready",
    }
    assert {x.error for x in r.results.values()} == {"no agent could be started"}
    from cfn_core.report import render_summary

    assert "agents never ready 2 (agent-0001: exited with status 3 before it was ready)" in render_summary(result)


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('plugins = ["batch"]\n[batch]\nsize = 0\n', "[batch] size = 0: must be an integer from 1 to 1000000"),
        ('plugins = ["batch"]\n[batch]\ntimeout_ms = "fast"\n', "[batch] timeout_ms = 'fast': must be an integer from 1 to 600000"),
        ('plugins = ["batch"]\n[batch]\nmax_size = 10\n', "[batch] max_size = 10 is smaller than [batch] size = 50"),
        ('plugins = ["shard"]\n[shard]\nstrategy = "sum"\n', "[shard] strategy = 'sum': must be one of hash, round-robin, random"),
        ('plugins = ["shard"]\n[shard]\ncount = 0\n', "[shard] count = 0: must be an integer from 1 to"),
    ],
)
def test_bad_batch_and_shard_settings_name_the_key_and_what_is_allowed(cli, tmp_path, toml, expected):
    (tmp_path / "cfn.toml").write_text(toml)
    line = error_line(cli("run"))
    assert expected in line
