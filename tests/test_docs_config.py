"""docs/CONFIG.md, the cfn.toml reference, lists exactly the keys the loader accepts.

The file is generated from the schema (docs/gen_config_reference.py); these tests
check that the committed file is current and, independently of the generator,
that every table, key, default and environment variable it names is the one the
loader really uses.
"""

import importlib.util
import os
import re
import tomllib
from pathlib import Path

import attrs
import pytest

from cfn_core.config import KERNEL_SECTIONS, config_from_dict, load_config, schemas
from cfn_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "CONFIG.md"


def generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented() -> dict[str, dict[str, dict]]:
    """``{table: {key: {"default": value, "env": [...], "allowed": text}}}`` parsed from CONFIG.md."""
    tables: dict[str, dict[str, dict]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^## \[([\w.-]+)\]$", line)
        if m:
            current = tables.setdefault(m.group(1), {})
            continue
        if line.startswith("## "):
            current = None
        m = re.match(r"^\| `(\w+)` \| `(.*?)` \| (.*?) \| (.*?) \| (.*) \|$", line)
        if m and current is not None:
            key, default, allowed, env, _meaning = m.groups()
            current[key] = {
                "default": tomllib.loads(f"v = {default.replace(chr(92) + '|', '|')}")["v"],
                "allowed": allowed,
                "env": re.findall(r"`(CFN_\w+)`", env),
            }
    return tables


def bundled_tables() -> dict[str, type]:
    return {table: cls for table, (_plugin, cls) in generator().plugin_tables().items()}


def test_the_committed_reference_is_current():
    expected = generator().render()
    assert DOC.read_text() == expected, "docs/CONFIG.md is out of date: run python docs/gen_config_reference.py"


def test_it_documents_every_kernel_and_bundled_table_and_nothing_else():
    assert set(documented()) == set(KERNEL_SECTIONS) | set(bundled_tables())


def test_keys_defaults_and_env_names_match_the_loader():
    docs = documented()
    live = schemas()  # the kernel's tables and every installed plugin's, as the loader sees them
    for table, cls in {**KERNEL_SECTIONS, **bundled_tables()}.items():
        cls = live.get(table, cls)  # an installed plugin: what the loader uses
        fields = {f.name: f for f in attrs.fields(cls)}
        assert list(docs[table]) == list(fields), f"[{table}] keys differ from the loader's"
        for key, fld in fields.items():
            default = fld.default.factory() if isinstance(fld.default, attrs.Factory) else fld.default
            doc_default = docs[table][key]["default"]
            assert (list(default) if isinstance(default, tuple) else default) == doc_default, f"[{table}] {key}"
            assert docs[table][key]["env"][0] == f"CFN_{table.upper()}_{key.upper()}"
            assert set(docs[table][key]["env"]) == {f"CFN_{table.upper()}_{key.upper()}", *fld.metadata["env"]}


def test_every_documented_default_is_accepted():
    live = schemas()
    for table, keys in documented().items():
        if table not in live:
            continue  # a bundled plugin that is not installed here
        data = {table: {k: v["default"] for k, v in keys.items()}}
        config = config_from_dict(data)
        for key, info in keys.items():
            value = getattr(config.section(table), key)
            assert (list(value) if isinstance(value, tuple) else value) == info["default"]


def test_every_documented_environment_variable_is_read():
    live = schemas()
    checked = 0
    for table, keys in documented().items():
        if table not in live:
            continue
        for key, info in keys.items():
            for var in info["env"]:
                try:
                    config = load_config(discover=False, env={var: "not-a-value"})
                except ConfigError as exc:
                    assert f"environment variable {var}" in str(exc)  # read, and rejected by name
                else:
                    value = getattr(config.section(table), key)  # a free-form string: read as given
                    given = ("not-a-value", ("not-a-value",), os.path.abspath("not-a-value"))  # a path: made absolute
                    assert value in given, f"{var} was not read into [{table}] {key}"
                checked += 1
    assert checked > 30


def test_an_undocumented_key_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key 'agent' in \[workload\].*did you mean 'agents'"):
        config_from_dict({"workload": {"agent": 5}})


def test_the_feature_flags_documented_are_the_loaders():
    from cfn_core.config import feature_flags

    text = DOC.read_text()
    flags = feature_flags()  # declared by the installed plugins (cfn_feature_flags)
    assert set(flags) >= {var for var in re.findall(r"^\| `(CFN_ENABLE_\w+)` \|", text, flags=re.M)}
    for var, name in flags.items():
        assert f"| `{var}` | `{name}` |" in text
        assert name in load_config(discover=False, env={var: "true"}).enabled()
        assert load_config(discover=False, env={"CFN_PLUGINS": name, var: "false"}).enabled() == []


def test_what_the_timeout_key_says_happens_to_a_command_is_what_happens(make_config, no_leaks):
    """`[workload] timeout`: a command over it is killed and its task fails at once (not retried,
    its agent is healthy); a Python handler's agent is killed and the task retried (tested in
    tests/test_faults_tasks.py).  The command sleeps far longer than the timeout: unmistakable."""
    from cfn_core import Coordinator

    assert "a command is killed with everything it started and its task fails (no retry)" in DOC.read_text()
    config = make_config(workload={"agents": 2, "command": "sleep 600", "timeout": 1.0, "max_attempts": 3})
    with Coordinator(config) as coord:
        result = coord.run(["a", "b"])
    assert result.failed == 2 and result.rounds[0].retries == 0
    for r in result.results.values():
        assert not r.ok and r.answered and r.attempts == 1
        assert r.error == "command timed out after 1s"
