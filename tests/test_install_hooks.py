"""The installation hooks: a plugin brings its `cfn` subcommands and its feature flags itself.

The plugins here are really installed (a dist-info with an entry point in group
``cfn`` on PYTHONPATH, what pip writes) and `cfn` runs as a separate process, so
entry-point discovery, the parser and the loader are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cfn_core.config import load_config
from cfn_core.errors import ConfigError
from cfn_core.testing import install_dist

GREETER = textwrap.dedent(
    '''
    """A plugin with a command and a feature flag, and no run hooks at all."""
    from cfn_core import CfnError, hookimpl

    @hookimpl
    def cfn_add_commands(subparsers):
        p = subparsers.add_parser("hello", help="say hello (plugin greeter)")
        p.add_argument("--name", default="world")
        p.set_defaults(func=hello)

    def hello(args):
        if args.name == "nobody":
            raise CfnError("--name nobody: name somebody")
        print(f"hello, {args.name}")
        return 0

    @hookimpl
    def cfn_feature_flags():
        return ("CFN_ENABLE_GREETING",)
    '''
)

#: adds a command whose name the kernel has; its failure must cost nobody else's commands
SQUATTER = textwrap.dedent(
    '''
    from cfn_core import hookimpl

    @hookimpl
    def cfn_add_commands(subparsers):
        subparsers.add_parser("run", help="taken")
    '''
)

#: declares another plugin's flag
COPYCAT = textwrap.dedent(
    '''
    from cfn_core import hookimpl

    @hookimpl
    def cfn_feature_flags():
        return ["CFN_ENABLE_GREETING"]
    '''
)


def install(site, name: str, source: str) -> None:
    """Install module ``cfn_<name>`` as plugin ``name`` the way pip does (dist-info + entry point)."""
    install_dist(site, f"cfn-{name}", {name: f"cfn_{name}"}, modules={f"cfn_{name}": source})


@pytest.fixture
def cfn(tmp_path, bus_root):
    """``cfn(*args, plugins={name: source}, env={...})``: run ``python -m cfn_core`` with those plugins installed."""

    def run(*args, plugins: dict[str, str], env=None):
        site = tmp_path / f"site-{len(list(tmp_path.glob('site-*')))}"
        site.mkdir()
        for name, source in plugins.items():
            install(site, name, source)
        merged = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
        merged.update(CFN_BUS_ROOT=str(bus_root), PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        merged.update(env or {})
        return subprocess.run([sys.executable, "-m", "cfn_core", *args], cwd=tmp_path, env=merged, capture_output=True, text=True, timeout=120)

    return run


def test_an_installed_plugin_adds_a_command_without_being_enabled(cfn):
    proc = cfn("hello", "--name", "cfn", plugins={"greeter": GREETER})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello, cfn\n"
    listed = cfn("--help", plugins={"greeter": GREETER})
    assert "say hello (plugin greeter)" in listed.stdout and "bench" in listed.stdout


def test_a_plugin_commands_usage_error_is_one_line_exit_2(cfn):
    proc = cfn("hello", "--name", "nobody", plugins={"greeter": GREETER})
    assert proc.returncode == 2 and proc.stderr == "cfn: error: --name nobody: name somebody\n"


def test_a_plugin_that_takes_a_kernel_command_name_is_warned_about_and_left_out(cfn):
    proc = cfn("--help", plugins={"greeter": GREETER, "squatter": SQUATTER})
    assert proc.returncode == 0, proc.stderr
    assert "plugin 'squatter' could not add its commands" in proc.stderr and "conflicting subparser: run" in proc.stderr
    assert "say hello" in proc.stdout and "run one coordination" in proc.stdout  # everybody else's commands are there


def test_a_plugin_declares_its_own_feature_flag(cfn):
    def status(env):
        proc = cfn("plugins", "--json", plugins={"greeter": GREETER}, env=env)
        assert proc.returncode == 0, proc.stderr
        return {row["name"]: row["status"] for row in json.loads(proc.stdout)}["greeter"]

    assert status({}) == "installed"
    assert status({"CFN_ENABLE_GREETING": "1"}) == "enabled"
    assert status({"CFN_ENABLE_GREETING": "1", "CFN_PLUGINS": "greeter", "CFN_DISABLE_PLUGINS": "greeter"}) == "blocked"


def test_a_feature_flag_declared_twice_is_an_error_naming_both_plugins(cfn):
    proc = cfn("plugins", plugins={"greeter": GREETER, "copycat": COPYCAT})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "both declare the feature flag CFN_ENABLE_GREETING" in line and "'greeter'" in line and "'copycat'" in line


def test_a_flag_no_installed_plugin_declares_is_warned_about(cfn):
    proc = cfn("plugins", plugins={"greeter": GREETER}, env={"CFN_ENABLE_GREETINGS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "CFN_ENABLE_GREETINGS is not the feature flag of an installed plugin (did you mean 'CFN_ENABLE_GREETING'?)" in proc.stderr


def test_the_kill_switch_beats_a_declared_flag_in_every_layer():
    flags = {"CFN_ENABLE_GREETING": "greeter"}
    env = {"CFN_ENABLE_GREETING": "true"}
    assert load_config(discover=False, env=env, plugin_schemas={}, flags=flags).enabled() == ["greeter"]
    for blocked in ({"CFN_DISABLE_PLUGINS": "greeter"}, {"CFN_PLUGINS": "no:greeter"}):
        assert load_config(discover=False, env=env | blocked, plugin_schemas={}, flags=flags).enabled() == []
    config = load_config(discover=False, env=env, plugin_schemas={}, flags=flags, overrides={"plugins": "no:greeter"})
    assert config.enabled() == [] and config.blocked() == ["greeter"]
    with pytest.raises(ConfigError, match=r"environment variable CFN_ENABLE_GREETING = 'sure': must be true or false"):
        load_config(discover=False, env={"CFN_ENABLE_GREETING": "sure"}, plugin_schemas={}, flags=flags)


def test_the_bundled_plugins_declare_the_plans_flags_and_commands():
    from cfn_core.config import feature_flags
    from cfn_core.plugins import installed

    flags = feature_flags()
    expected = {"CFN_ENABLE_POOLING": "pool", "CFN_ENABLE_BATCHING": "batch", "CFN_ENABLE_PARALLEL_SPAWN": "parallel", "CFN_ENABLE_SHARDING": "shard"}
    for var, name in expected.items():
        if name in installed():
            assert flags.get(var) == name
    if "redis" in installed():
        proc = subprocess.run([sys.executable, "-m", "cfn_core", "agent", "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--bus URL" in proc.stdout
