"""Configuration: precedence, discovery, environment names, feature flags, `cfn init` round trip.

Every test passes ``env=`` explicitly so the developer's own CFN_* variables cannot leak in,
and most pass ``plugin_schemas`` so the result does not depend on which plugins are installed.
"""

from __future__ import annotations

import os

import attrs
import pytest

from cfn_core.config import (
    Config,
    config_from_dict,
    env_names,
    load_config,
    render_default_toml,
    setting,
)
from cfn_core.errors import ConfigError


@attrs.define(frozen=True)
class PoolLike:
    """``[pool]``: a stand-in for a plugin's table."""

    size: int = setting(4, "agents kept warm", min=1, max=1000)
    warm: bool = setting(False, "pre-spawn at start")


@attrs.define(frozen=True)
class SpawnLike:
    """``[parallel]``: a table with one of the plan's extra environment names."""

    parallelism: int = setting(8, "launches at once", env=("CFN_SPAWN_PARALLELISM",), min=1, max=512)


SCHEMAS = {"pool": PoolLike, "parallel": SpawnLike}

#: the plan's feature flags, as the bundled plugins declare them (cfn_feature_flags);
#: tests/test_docs_config.py checks the installed plugins really do
FEATURE_FLAGS = {
    "CFN_ENABLE_POOLING": "pool",
    "CFN_ENABLE_BATCHING": "batch",
    "CFN_ENABLE_PARALLEL_SPAWN": "parallel",
    "CFN_ENABLE_SHARDING": "shard",
}


def load(path=None, env=None, overrides=None, **kw):
    kw.setdefault("plugin_schemas", SCHEMAS)
    kw.setdefault("flags", FEATURE_FLAGS)
    return load_config(path, env=env or {}, overrides=overrides, **kw)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- precedence


def test_defaults_without_any_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load()
    assert config.path is None
    assert config.workload.agents == 10
    assert config.workload.topology == "star"
    assert config.section("pool").size == 4
    assert config.plugins == ()


def test_precedence_flag_over_env_over_file_over_default(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", "[workload]\nagents = 3\nrounds = 2\n[pool]\nsize = 9\n")
    monkeypatch.chdir(tmp_path)
    env = {"CFN_WORKLOAD_AGENTS": "4", "CFN_POOL_SIZE": "11"}

    assert load().workload.agents == 3  # file over default
    assert load().workload.payload_bytes == 64  # untouched key: default
    assert load(env=env).workload.agents == 4  # env over file
    assert load(env=env).section("pool").size == 11
    flag = load(env=env, overrides={"workload.agents": "5", "pool.size": 12})
    assert flag.workload.agents == 5  # command line over env
    assert flag.section("pool").size == 12
    assert flag.workload.rounds == 2  # the file still supplies what nobody overrides


def test_override_none_means_not_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(env={"CFN_AGENTS": "6"}, overrides={"workload.agents": None})
    assert config.workload.agents == 6


def test_kernel_alias_cfn_agents_and_generic_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(env={"CFN_AGENTS": "42"}).workload.agents == 42
    # both set: the generic CFN_<TABLE>_<KEY> name wins, the alias is a convenience
    assert load(env={"CFN_AGENTS": "42", "CFN_WORKLOAD_AGENTS": "43"}).workload.agents == 43


def test_env_values_are_parsed_by_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {
        "CFN_RUN_STRICT": "yes",
        "CFN_WORKLOAD_TIMEOUT": "2.5",
        "CFN_WORKLOAD_TOPOLOGY": "mesh",
        "CFN_SPAWN_PARALLELISM": "16",
        "CFN_POOL_WARM": "on",
    }
    config = load(env=env)
    assert config.run.strict is True
    assert config.workload.timeout == 2.5
    assert config.workload.topology == "mesh"
    assert config.section("parallel").parallelism == 16
    assert config.section("pool").warm is True
    assert load(env={"CFN_RUN_STRICT": "0"}).run.strict is False


def test_env_names_of_a_key():
    fld = attrs.fields_dict(SpawnLike)["parallelism"]
    assert env_names("parallel", fld) == ("CFN_PARALLEL_PARALLELISM", "CFN_SPAWN_PARALLELISM")


@pytest.mark.parametrize(
    "var, plugin",
    [("CFN_POOL_SIZE", "pool"), ("CFN_BATCH_SIZE", "batch"), ("CFN_SPAWN_PARALLELISM", "parallel"), ("CFN_SHARD_COUNT", "shard")],
)
def test_plan_variable_names_once_the_plugins_are_installed(var, plugin, tmp_path, monkeypatch):
    from cfn_core.config import schemas
    from cfn_core.plugins import installed

    if plugin not in installed():
        pytest.skip(f"plugin {plugin!r} is not installed")
    monkeypatch.chdir(tmp_path)
    all_schemas = schemas()
    matches = [(t, f) for t, cls in all_schemas.items() for f in attrs.fields(cls) if var in env_names(t, f)]
    assert matches, f"{var} (the plan's name) is not read by any installed table"
    table, fld = matches[0]
    value = 7 if fld.metadata.get("min") is None or fld.metadata["min"] <= 7 else fld.metadata["min"]
    config = load_config(None, env={var: str(value)})
    assert getattr(config.section(table), fld.name) == value


# ---------------------------------------------------------------------- discovery


def test_cfn_toml_is_discovered_upward(tmp_path, monkeypatch):
    cfg = write(tmp_path / "proj" / "cfn.toml", "[workload]\nagents = 7\n")
    deep = tmp_path / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    config = load()
    assert config.workload.agents == 7
    assert config.path == str(cfg)


def test_pyproject_tool_cfn_is_discovered(tmp_path, monkeypatch):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.cfn]\nplugins = ["pool"]\n\n[tool.cfn.workload]\nagents = 8\n')
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    config = load()
    assert config.workload.agents == 8
    assert config.plugins == ("pool",)
    assert config.path == str(tmp_path / "pyproject.toml")


def test_pyproject_without_tool_cfn_does_not_stop_the_search(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", "[workload]\nagents = 5\n")
    write(tmp_path / "inner" / "pyproject.toml", '[project]\nname = "inner"\n')
    monkeypatch.chdir(tmp_path / "inner")
    assert load().workload.agents == 5


def test_cfn_toml_wins_over_pyproject_in_the_same_directory(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", "[workload]\nagents = 5\n")
    write(tmp_path / "pyproject.toml", "[tool.cfn.workload]\nagents = 6\n")
    monkeypatch.chdir(tmp_path)
    assert load().workload.agents == 5


def test_explicit_config_path_overrides_discovery(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", "[workload]\nagents = 5\n")
    other = write(tmp_path / "elsewhere" / "custom.toml", "[workload]\nagents = 13\n")
    monkeypatch.chdir(tmp_path)
    config = load(other)
    assert config.workload.agents == 13
    assert config.path == str(other)


def test_explicit_pyproject_path_reads_tool_cfn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = write(tmp_path / "x" / "pyproject.toml", "[tool.cfn.workload]\nagents = 14\n")
    assert load(py).workload.agents == 14


def test_missing_explicit_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope\.toml: no such file"):
        load(tmp_path / "nope.toml")


def test_discover_false_ignores_files(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", "[workload]\nagents = 5\n")
    monkeypatch.chdir(tmp_path)
    assert load(discover=False).workload.agents == 10


# ---------------------------------------------------------------------- plugin list


def test_plugins_from_file_env_and_flag(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", 'plugins = ["pool"]\n')
    monkeypatch.chdir(tmp_path)
    assert load().plugins == ("pool",)
    assert load(env={"CFN_PLUGINS": "batch, shard"}).plugins == ("batch", "shard")
    assert load(env={"CFN_PLUGINS": "batch"}, overrides={"plugins": "parallel"}).plugins == ("parallel",)
    # an empty list means the baseline; "baseline" is accepted as a name for it
    assert load(overrides={"plugins": ""}).plugins == ()
    assert load(overrides={"plugins": "baseline"}).plugins == ()


@pytest.mark.parametrize("var, name", sorted(FEATURE_FLAGS.items()))
def test_feature_flags_map_onto_the_plugin_list(var, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on = load(env={var: "1"})
    assert name in on.enabled()
    both = load(env={var: "true"}, overrides=None)
    assert both.enabled().count(name) == 1
    write(tmp_path / "cfn.toml", f'plugins = ["{name}"]\n')
    off = load(env={var: "0"})
    assert name not in off.enabled()


def test_feature_flag_keeps_the_rest_of_the_list(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", 'plugins = ["pool", "shard"]\n')
    monkeypatch.chdir(tmp_path)
    config = load(env={"CFN_ENABLE_BATCHING": "yes", "CFN_ENABLE_SHARDING": "no"})
    assert config.enabled() == ["pool", "batch"]


def test_feature_flag_with_a_bad_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"CFN_ENABLE_POOLING = 'maybe': must be true or false"):
        load(env={"CFN_ENABLE_POOLING": "maybe"})


def test_disable_plugins_env_blocks_names(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", 'plugins = ["pool", "batch"]\n')
    monkeypatch.chdir(tmp_path)
    config = load(env={"CFN_DISABLE_PLUGINS": "batch"})
    assert config.enabled() == ["pool"]
    assert config.blocked() == ["batch"]


def test_no_prefix_blocks_a_plugin(tmp_path, monkeypatch):
    write(tmp_path / "cfn.toml", 'plugins = ["pool", "batch", "no:pool"]\n')
    monkeypatch.chdir(tmp_path)
    config = load()
    assert config.enabled() == ["batch"]
    assert config.blocked() == ["pool"]


# ---------------------------------------------------------------------- round trips


def test_cfn_init_output_round_trips_to_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = render_default_toml(plugin_schemas=SCHEMAS)
    assert "# agents in one coordination" in text  # commented
    assert "CFN_AGENTS" in text and "CFN_SPAWN_PARALLELISM" in text
    path = write(tmp_path / "cfn.toml", text)
    from_file = load(path)
    defaults = load(discover=False)
    # the one difference: handlers and commands are found next to the file
    assert from_file.workload.directory == str(tmp_path.resolve())
    sections = {**from_file.sections, "workload": attrs.evolve(from_file.workload, directory="")}
    from_file = attrs.evolve(from_file, sections=sections)
    assert from_file.to_dict() == defaults.to_dict()
    assert attrs.evolve(from_file, path=None) == defaults


def test_cfn_init_output_round_trips_with_the_installed_plugins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "cfn.toml", render_default_toml())
    from_file = load_config(path, env={}).evolve(workload={"directory": ""})  # the file's directory, else equal
    assert from_file.to_dict() == load_config(None, env={}, discover=False).to_dict()


def test_to_dict_and_config_from_dict_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(env={"CFN_AGENTS": "33", "CFN_PLUGINS": "pool,no:batch"}, overrides={"pool.warm": "true"})
    again = config_from_dict(config.to_dict(), plugin_schemas=SCHEMAS)
    assert again == config


def test_evolve_validates_like_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_from_dict({}, plugin_schemas={})
    bigger = config.evolve(workload={"agents": 50}, plugins=["pool"])
    assert bigger.workload.agents == 50 and bigger.plugins == ("pool",)
    assert config.workload.agents == 10  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match=r"\[workload\] agents = 0: must be an integer from 1 to 100000"):
        config.evolve(workload={"agents": 0})


def test_config_is_frozen():
    config = config_from_dict({}, plugin_schemas={})
    assert isinstance(config, Config)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.workload.agents = 3  # type: ignore[misc]


def test_environment_is_read_from_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CFN_WORKLOAD_PAYLOAD_BYTES", "99")
    assert load_config(None, plugin_schemas={}).workload.payload_bytes == 99
    assert os.environ["CFN_WORKLOAD_PAYLOAD_BYTES"] == "99"


def test_feature_flag_off_does_not_require_the_plugin_installed(tmp_path, monkeypatch):
    from cfn_core.plugins import make_plugin_manager

    monkeypatch.chdir(tmp_path)
    config = load(env={flag: "false" for flag in FEATURE_FLAGS})
    assert config.plugins == ()
    make_plugin_manager(config)  # no "unknown plugin" for a plugin merely switched off


def test_explicit_pyproject_without_tool_cfn_is_an_error(tmp_path):
    py = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"--config .*pyproject.toml: has no \[tool.cfn\] table"):
        load(py)
