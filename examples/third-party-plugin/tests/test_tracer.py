"""cfn-tracer's tests: a real plugin manager and real coordinations (no mocks).

Run with the package installed (``pip install -e .``), so that cfn finds the
entry point: ``pytest`` in this directory.  The fixtures ``make_config`` (a
validated config on a private bus root) and ``no_leaks`` (no process or file
descriptor left behind) come with cfn-core's pytest plugin.
"""

import json
from collections import Counter

import pytest

import cfn_tracer
from cfn_core import ConfigError, Coordinator
from cfn_core.plugins import hook_call_order, installed, make_plugin_manager


def read_trace(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_entry_point_is_installed():
    assert installed()["tracer"].value == "cfn_tracer"


def test_plugin_manager_registers_the_wrapper(make_config, tmp_path):
    config = make_config(plugins=("tracer",), tracer={"path": str(tmp_path / "t.jsonl")})
    pm = make_plugin_manager(config)  # also runs check_pending() and cfn_configure
    assert pm.get_plugin("tracer") is cfn_tracer
    order = hook_call_order(pm)
    assert "tracer" in order["cfn_send"]  # wraps the send step ...
    assert order["cfn_send"][-1] == "builtin"  # ... which the baseline still performs
    assert [impl.wrapper for impl in pm.hook.cfn_send.get_hookimpls() if impl.plugin_name == "tracer"] == [True]


def test_every_message_of_a_mesh_run_is_traced(make_config, no_leaks, tmp_path):
    trace = tmp_path / "trace.jsonl"
    config = make_config(
        plugins=("tracer",),
        workload={"agents": 4, "topology": "mesh", "messages_per_agent": 3},
        tracer={"path": str(trace)},
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    records = read_trace(trace)
    kinds = Counter(r["kind"] for r in records)
    assert kinds["task"] == kinds["result"] == kinds["ready"] == 4
    assert kinds["peer"] == 4 * 3
    assert kinds["stop"] == 4
    assert all(r["ok"] for r in records)
    assert len({r["id"] for r in records}) == len(records)  # every message once
    assert {r["side"] for r in records} == {"coordinator", "agent"}
    assert len({r["pid"] for r in records if r["side"] == "agent"}) == 4
    assert len({r["run"] for r in records}) == 1
    # the summary's figure comes from cfn_report (the baseline stops a round's agents before it)
    assert result.plugin_figures["tracer"]["records"] == len(records)


def test_bodies_are_written_only_when_asked(make_config, no_leaks, tmp_path):
    trace = tmp_path / "trace.jsonl"
    config = make_config(
        plugins=("tracer",), workload={"agents": 2, "payload_bytes": 5}, tracer={"path": str(trace), "bodies": True}
    )
    with Coordinator(config) as coord:
        assert coord.run().ok
    results = [r for r in read_trace(trace) if r["kind"] == "result"]
    assert [r["body"]["value"] for r in results] == ["xxxxx", "xxxxx"]


def test_not_enabled_means_no_trace(make_config, no_leaks, tmp_path):
    trace = tmp_path / "trace.jsonl"
    config = make_config(workload={"agents": 2}, tracer={"path": str(trace)})  # the table is still accepted
    with Coordinator(config) as coord:
        assert coord.run().ok
    assert not trace.exists()


def test_a_missing_directory_is_a_config_error(make_config, tmp_path):
    config = make_config(plugins=("tracer",), tracer={"path": str(tmp_path / "nope" / "t.jsonl")})
    with pytest.raises(ConfigError, match=r"\[tracer\] path = .*nope.* does not exist"):
        make_plugin_manager(config)


def test_a_wrong_type_is_reported_by_cfn(make_config):
    with pytest.raises(ConfigError, match=r"\[tracer\] bodies = 'yes': must be true or false"):
        make_config(plugins=("tracer",), tracer={"bodies": "yes"})
