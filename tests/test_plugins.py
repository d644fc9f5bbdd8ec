"""Plugin loading: entry points, selection, blocking, unknown and broken plugins, `cfn plugins`.

Plugins here are real distributions: a ``*.dist-info`` directory with an
``entry_points.txt`` on ``sys.path`` (and on ``PYTHONPATH`` for subprocesses) is
exactly what ``pip install`` leaves behind, so ``importlib.metadata`` finds them
the way it finds cfn-pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cfn_core import Coordinator
from cfn_core.config import config_from_dict, load_config
from cfn_core.testing import install_dist
from cfn_core.errors import ConfigError, PluginError
from cfn_core.plugins import describe_plugins, hook_call_order, installed, load_plugin, make_plugin_manager

TRACER = '''
"""A test plugin: records which process loaded it, adds a table, takes assignment."""
import os
import attrs
from cfn_core import hookimpl, setting


@attrs.define(frozen=True)
class TracerSettings:
    """[tracer]"""
    dir: str = setting("", "where agents leave a marker file")
    level: int = setting(1, "verbosity", min=0, max=3)


@hookimpl
def cfn_settings():
    return {"tracer": TracerSettings}


@hookimpl
def cfn_configure(config):
    os.environ["CFN_TRACER_CONFIGURED"] = "1"


@hookimpl
def cfn_agent_init(ctx):
    where = ctx.config.section("tracer").dir
    if where:
        with open(os.path.join(where, ctx.agent_id), "w") as f:
            f.write(str(os.getpid()))


@hookimpl
def cfn_assign(ctx, task, agent_ids):
    return None  # look, but hand the step on


@hookimpl
def cfn_report(ctx):
    return {"tracer": {"seen": True}}
'''

FLAKY = '''
"""A test plugin whose agent-side flush always fails (its flusher thread died)."""
from cfn_core import hookimpl


@hookimpl
def cfn_flush(ctx, reason):
    if ctx.side == "agent":
        raise OSError("flusher thread died")
'''

BROKEN = '''
raise RuntimeError("this plugin is broken on purpose")
'''

MISSPELT = '''
from cfn_core import hookimpl


@hookimpl
def cfn_spwan(ctx, agent_ids):
    return None
'''


def make_dist(site, dist, version, module, code, entry_points):
    install_dist(site, dist, entry_points, modules={module: code}, version=version)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site directory with three installed plugin distributions, visible to this process and its children."""
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "cfn-tracer", "1.2.3", "cfn_tracer_plugin", TRACER, {"tracer": "cfn_tracer_plugin"})
    make_dist(site, "cfn-broken", "0.0.1", "cfn_broken_plugin", BROKEN, {"broken": "cfn_broken_plugin"})
    make_dist(site, "cfn-misspelt", "0.1", "cfn_misspelt_plugin", MISSPELT, {"misspelt": "cfn_misspelt_plugin"})
    make_dist(site, "cfn-flaky", "0.2", "cfn_flaky_plugin", FLAKY, {"flaky": "cfn_flaky_plugin"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("CFN_TRACER_CONFIGURED", raising=False)
    installed.cache_clear()
    load_plugin.cache_clear()
    yield site
    installed.cache_clear()
    load_plugin.cache_clear()
    for mod in ("cfn_tracer_plugin", "cfn_broken_plugin", "cfn_misspelt_plugin", "cfn_flaky_plugin"):
        sys.modules.pop(mod, None)


def cfg(plugins=(), **tables):
    return config_from_dict({"plugins": list(plugins), **tables})


def test_entry_points_are_installed_plugins(site):
    eps = installed()
    assert {"tracer", "broken", "misspelt"} <= set(eps)
    assert eps["tracer"].value == "cfn_tracer_plugin"


def test_enabled_plugin_is_registered_configured_and_called_first(site):
    pm = make_plugin_manager(cfg(["tracer"]))
    assert pm.get_plugin("tracer") is load_plugin("tracer")
    assert os.environ["CFN_TRACER_CONFIGURED"] == "1"  # cfn_configure ran
    order = hook_call_order(pm)
    # the fallback wrapper runs around everything; the plugin before the trylast baseline
    assert order["cfn_assign"] == ["fallback", "tracer", "builtin"]
    assert order["cfn_report"] == ["tracer"]


def test_installed_but_not_enabled_plugin_is_not_registered(site):
    pm = make_plugin_manager(cfg())
    assert pm.get_plugin("tracer") is None
    assert "CFN_TRACER_CONFIGURED" not in os.environ


def test_installed_plugin_table_is_validated_even_when_disabled(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={"CFN_TRACER_LEVEL": "3"})
    assert config.section("tracer").level == 3
    with pytest.raises(ConfigError, match=r"\[tracer\] level = 9: must be an integer from 0 to 3"):
        load_config(None, env={}, overrides={"tracer.level": 9})


def test_no_name_blocks_an_enabled_plugin(site):
    pm = make_plugin_manager(cfg(["tracer", "no:tracer"]))
    assert pm.get_plugin("tracer") is None


def test_unknown_plugin_lists_installed_ones_with_did_you_mean(site):
    with pytest.raises(PluginError) as info:
        make_plugin_manager(cfg(["tracr"]))
    msg = str(info.value)
    assert "unknown plugin 'tracr' (did you mean 'tracer'?)" in msg
    assert "installed plugins:" in msg and "tracer" in msg and "broken" in msg


def test_blocking_an_unknown_plugin_is_an_error_too(site):
    with pytest.raises(PluginError, match=r"unknown plugin 'tracers' \(did you mean 'tracer'\?\)"):
        make_plugin_manager(cfg(["no:tracers"]))


def test_plugin_that_cannot_be_imported_names_itself_and_the_reason(site):
    with pytest.raises(PluginError, match=r"plugin 'broken' \(cfn_broken_plugin\) cannot be imported: this plugin is broken on purpose"):
        make_plugin_manager(cfg(["broken"]))


def test_broken_plugin_does_not_block_the_others(site):
    pm = make_plugin_manager(cfg(["tracer"]))  # loading tables skips the broken one
    assert pm.get_plugin("tracer") is not None


def test_misspelt_hook_fails_at_start(site):
    with pytest.raises(PluginError, match=r"implements a hook cfn does not have.*cfn_spwan"):
        make_plugin_manager(cfg(["misspelt"]))


def test_extra_plugin_objects_are_registered(site):
    class Spy:
        name = "spy"

        def cfn_report(self, ctx):
            return {"spy": {}}

    from cfn_core import hookimpl

    Spy.cfn_report = hookimpl(Spy.cfn_report)
    spy = Spy()
    pm = make_plugin_manager(cfg(), [spy])
    assert pm.get_plugin("spy") is spy
    assert hook_call_order(pm)["cfn_report"] == ["spy"]


def test_describe_plugins_rows(site):
    rows = {r["name"]: r for r in describe_plugins(cfg(["tracer"]))}
    tracer = rows["tracer"]
    assert tracer["distribution"] == "cfn-tracer"
    assert tracer["version"] == "1.2.3"
    assert tracer["status"] == "enabled"
    assert tracer["hooks"] == ["cfn_agent_init", "cfn_assign", "cfn_configure", "cfn_report", "cfn_settings"]
    assert tracer["call_order"]["cfn_assign"] == ["fallback", "tracer", "builtin"]
    assert rows["builtin"]["status"] == rows["fallback"]["status"] == "builtin"
    assert rows["builtin"]["distribution"] == "cfn-core"
    assert rows["builtin"]["call_order"]["cfn_assign"] == ["fallback", "tracer", "builtin"]
    assert rows["broken"]["status"] == "broken" and "broken on purpose" in rows["broken"]["error"]
    assert rows["misspelt"]["status"] == "installed"
    assert rows["flaky"]["status"] == "installed"
    blocked = {r["name"]: r for r in describe_plugins(cfg(["no:tracer"]))}
    assert blocked["tracer"]["status"] == "blocked"
    assert blocked["tracer"]["call_order"] == {}  # not called when blocked
    assert blocked["builtin"]["call_order"]["cfn_assign"] == ["fallback", "builtin"]


def test_describe_plugins_rejects_unknown_names(site):
    with pytest.raises(PluginError, match=r"unknown plugin 'tracr' \(did you mean 'tracer'\?\)"):
        describe_plugins(cfg(["tracr"]))


def cfn(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cfn_core", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cfn_plugins_json(site, tmp_path):
    proc = cfn("plugins", "--json", "--plugins", "tracer", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["tracer"]["status"] == "enabled"
    assert rows["tracer"]["version"] == "1.2.3"
    assert rows["tracer"]["distribution"] == "cfn-tracer"
    assert "cfn_assign" in rows["tracer"]["hooks"]
    assert rows["tracer"]["call_order"]["cfn_assign"] == ["fallback", "tracer", "builtin"]
    assert rows["broken"]["status"] == "broken"


def test_cfn_plugins_text(site, tmp_path):
    (tmp_path / "cfn.toml").write_text('plugins = ["no:tracer"]\n')
    proc = cfn("plugins", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tracer = next(line for line in lines if line.startswith("tracer"))
    assert "blocked" in tracer and "cfn-tracer 1.2.3" in tracer and "(cfn_tracer_plugin)" in tracer
    assert any("cfn_assign" in line and "call order: fallback > builtin" in line for line in lines)
    assert any("error:" in line and "broken on purpose" in line for line in lines)
    hooks_line = lines[lines.index(tracer) + 1]
    assert hooks_line.strip() == (
        "hooks: cfn_agent_init, cfn_assign, cfn_configure, cfn_report, cfn_settings (enable it to see the call order)"
    )


def test_cfn_plugins_unknown_name_exits_2(site, tmp_path):
    proc = cfn("plugins", "--plugins", "tracr", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]  # one line
    assert "unknown plugin 'tracr' (did you mean 'tracer'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_agents_load_the_same_plugins_as_the_coordinator(site, make_config, no_leaks, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    config = make_config(plugins=("tracer",), workload={"agents": 3}, tracer={"dir": str(markers)})
    with Coordinator(config) as coord:
        result = coord.run()
        pids = {h.id: h.pid for h in coord.ctx.agents.values()}
    assert result.ok
    assert result.plugin_figures == {"tracer": {"seen": True}}
    assert {p.name: int(p.read_text()) for p in markers.iterdir()} == pids


def test_every_installed_plugin_loads_and_describes_itself():
    installed.cache_clear()
    rows = describe_plugins(cfg())
    for row in rows:
        assert row["status"] in ("builtin", "installed"), row
        assert row["distribution"] and row["version"], row
        assert row["hooks"], f"{row['name']} implements no hook"
        assert all(h.startswith("cfn_") for h in row["hooks"])


@pytest.mark.parametrize("name", ["pool", "batch", "parallel", "shard"])
def test_bundled_plugins_come_first_before_the_baseline(name):
    if name not in installed():
        pytest.skip(f"{name} is not installed")
    pm = make_plugin_manager(cfg([name]))
    for hook, order in hook_call_order(pm).items():
        if "builtin" in order and name in order:
            assert order.index(name) < order.index("builtin"), (hook, order)


def test_agent_side_fallbacks_reach_the_summary_and_the_metrics(site, make_config, no_leaks):
    from cfn_core.report import render_summary

    config = make_config(plugins=("flaky",), workload={"agents": 3, "rounds": 2})
    with Coordinator(config) as coord:
        result = coord.run()
        counted = coord.ctx.metrics.registry.get_sample_value(
            "cfn_fallbacks_total", {"hook": "cfn_flush", "plugin": "flaky"}
        )
    assert result.ok  # the agents used the baseline (nothing buffered) and carried on
    [fb] = result.fallbacks
    assert fb["side"] == "agent" and fb["hook"] == "cfn_flush" and fb["plugin"] == "flaky"
    assert fb["error"] == "OSError: flusher thread died"
    # each of the 6 agent processes (3 per round) flushed, and fell back, at least once before its result
    assert fb["count"] >= 6 and counted == fb["count"]
    assert "fallback: flaky failed in cfn_flush in agents" in render_summary(result)
