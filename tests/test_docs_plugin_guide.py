"""docs/PLUGIN_GUIDE.md documents every hook with its exact signature (as datasette does).

The hookspecs are read with ``inspect``, so adding, renaming or changing a hook
(its parameters or their annotations) without updating the guide fails here; the
guide's code samples are run for real.
"""

import inspect
import re
import types
from pathlib import Path

from cfn_core import Coordinator, hookspecs
from cfn_core.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "PLUGIN_GUIDE.md"


def hookspec_functions() -> dict:
    return {
        name: func
        for name, func in vars(hookspecs).items()
        if name.startswith("cfn_") and callable(func) and hasattr(func, "cfn_spec")
    }


def shown_signature(func) -> str:
    """The signature as the guide shows it: ``(config: Config, run_ref: str | None) -> Bus | None``."""
    return str(inspect.signature(func)).replace("'", "")  # annotations are strings (postponed evaluation)


def documented_hooks() -> dict[str, tuple[str, str]]:
    """``{hook: (signature text, the section's text)}`` from the guide's ``### `cfn_x(...) -> T` `` headings."""
    text = GUIDE.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    out = {}
    for section in sections:
        m = re.match(r"`(cfn_\w+)(\(.*?\)(?: -> [^`]+)?)`\n", section)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} documented twice"
            out[m.group(1)] = (m.group(2), section[m.end():].split("\n## ")[0])
    return out


def test_every_hook_is_documented_with_its_exact_signature():
    docs = documented_hooks()
    specs = hookspec_functions()
    assert len(specs) >= 20
    missing = sorted(set(specs) - set(docs))
    assert not missing, f"hooks missing from docs/PLUGIN_GUIDE.md: {missing}"
    for name, func in specs.items():
        assert docs[name][0] == shown_signature(func), f"{name}: the guide's signature differs from hookspecs.py"


def test_no_hook_is_documented_that_does_not_exist():
    assert sorted(set(documented_hooks()) - set(hookspec_functions())) == []


def test_firstresult_and_sides_are_stated_for_every_hook():
    docs = documented_hooks()
    for name, func in hookspec_functions().items():
        body = docs[name][1].strip()
        first = body.split("·")[0]
        if func.cfn_spec["firstresult"]:
            assert first.startswith("*firstresult*"), f"{name} is firstresult: say so first"
        else:
            assert "firstresult" not in first, f"{name} is not firstresult"
        side = body.split("·")[1]
        assert re.search(r"\b(C|A|H|both sides)\b", side), f"{name}: which side calls it?"


def test_the_ten_line_plugin_runs(make_config, no_leaks, capfd):
    source = re.search(r"```python\n# my_plugin\.py\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    plugin = types.ModuleType("my_plugin")
    exec(compile(source, "my_plugin.py", "exec"), plugin.__dict__)
    with Coordinator(make_config(workload={"agents": 2}), extra_plugins=[plugin]) as coord:
        assert coord.run().ok
    assert re.search(r"round 1: 4/4 delivered in \d+\.\d{3} s", capfd.readouterr().out)


def test_the_settings_sample_validates_like_a_kernel_table():
    source = re.search(r"```python\n(from attrs import define\n.*?)```", GUIDE.read_text(), re.S).group(1)
    ns: dict = {}
    exec(source, ns)
    tables = ns["cfn_settings"]()
    config = config_from_dict({"mine": {"size": 7}}, plugin_schemas=tables)
    assert config.section("mine").size == 7 and config.section("mine").mode == "fast"
    try:
        config_from_dict({"mine": {"mode": "quick"}}, plugin_schemas=tables)
    except Exception as exc:
        assert "[mine] mode = 'quick': must be one of fast, safe" in str(exc)
    else:
        raise AssertionError("an invalid choice was accepted")


def test_the_ordering_rule_holds_and_cfn_plugins_shows_it():
    """The guide: the last listed plugin is asked first, and `cfn plugins` prints the real order."""
    import pytest

    from cfn_core.plugins import describe_plugins, hook_call_order, installed, make_plugin_manager

    if not {"pool", "parallel"} <= set(installed()):
        pytest.skip("needs the bundled pool and parallel plugins (pip install -r requirements.txt)")
    for plugins in (["pool", "parallel"], ["parallel", "pool"]):
        config = config_from_dict({"plugins": plugins})
        real = hook_call_order(make_plugin_manager(config))["cfn_agent_started"]
        assert real == plugins[::-1]
        shown = {row["name"]: row["call_order"] for row in describe_plugins(config)}
        assert shown["pool"]["cfn_agent_started"] == real
