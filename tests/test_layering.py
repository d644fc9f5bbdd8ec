"""The layering rule (docs/ARCHITECTURE.md, "Layering"): the kernel knows no plugin, plugins use its public API.

Checked on the source with an AST walk (nothing checked is imported):

* a bundled plugin's modules (``plugins/*/cfn_*/``) import from the kernel only
  the names ``cfn_core`` exports (``cfn_core.__all__``) and ``cfn_core.hookspecs``,
  and never another bundled plugin (by import or by a module name in a string);
* the kernel (``cfn_core/``, docstrings and comments aside) never names a bundled
  plugin's module, nor a bundled plugin's entry-point name as a string of its own.
  ``cfn_core/bench/`` is outside the rule: it is the benchmark harness, whose
  default matrix lists the bundled plugins.

What is left in modules other work is reshaping is in :data:`ALLOWED`, with the
reason; an entry that no longer matches a violation fails, so the list only shrinks.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

import cfn_core
from cfn_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]

#: the only kernel module besides the top-level package that plugins may import
PUBLIC_MODULES = {"cfn_core", "cfn_core.hookspecs"}

#: (file relative to the checked tree, violation) -> why it is still there.  Empty it.
ALLOWED: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------- the checker


def bundled_modules(root: Path) -> set[str]:
    """Top-level module names of the bundled plugins (``cfn_pool``, ...)."""
    return {p.parent.name for p in root.glob("plugins/*/cfn_*/__init__.py")}


def bundled_names(root: Path) -> set[str]:
    """Entry-point names of the bundled plugins (``pool``, ...)."""
    names = set()
    for pyproject in root.glob("plugins/*/pyproject.toml"):
        names |= set(tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get("cfn", {}))
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of string statements: docstrings, and strings standing alone as comments."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def _strings(tree: ast.AST):
    """(line, text) of every string constant in code (docstrings left out)."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def plugin_violations(source: str, own: str, others: set[str], public: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for every kernel-private name and other bundled plugin that a plugin module uses.

    :param own: the plugin's own top-level module (``cfn_pool``); importing it is fine.
    :param others: the other bundled plugins' modules.
    :param public: the names ``cfn_core`` exports.
    """
    tree = ast.parse(source)
    out = []

    def module_rule(line: int, module: str, names=()) -> None:
        top = module.split(".")[0]
        if top in others:
            out.append((line, f"imports {module} (another bundled plugin)"))
        elif top == "cfn_core" and module not in PUBLIC_MODULES:
            out.extend([(line, f"imports {module}.{name}") for name in names] or [(line, f"imports {module}")])
        elif module == "cfn_core":
            out.extend((line, f"imports cfn_core.{name}") for name in names if name not in public)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_rule(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module_rule(node.lineno, node.module, [alias.name for alias in node.names])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfn_core":
            if node.attr not in public and node.attr != "hookspecs":  # `import cfn_core; cfn_core.agent.x`
                out.append((node.lineno, f"uses cfn_core.{node.attr}"))
    for line, text in _strings(tree):  # importlib.import_module("cfn_pool.zygote"), -m cfn_pool...
        for module in sorted(others):
            if re.search(rf"\b{module}\b", text):
                out.append((line, f"names {module} (another bundled plugin)"))
    return out


def kernel_violations(source: str, modules: set[str], names: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for every bundled plugin the kernel module names in code.

    :param modules: the bundled plugins' modules: named anywhere in code (an import,
        a name, inside a string) is a violation.
    :param names: their entry-point names: a string that *is* one is a violation
        (``"pool"``); one inside a help text (``e.g. pool,batch``) is not.
    """
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, f"imports {a.name}") for a in node.names if a.name.split(".")[0] in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in modules:
            out.append((node.lineno, f"imports {node.module}"))
        elif isinstance(node, ast.Name) and node.id in modules:
            out.append((node.lineno, f"names {node.id}"))
    for line, text in _strings(tree):
        out.extend((line, f"names {m}") for m in sorted(modules) if re.search(rf"\b{m}\b", text))
        if text in names:
            out.append((line, f"names the plugin {text!r}"))
    return out


def layering_violations(root: Path) -> list[tuple[str, int, str]]:
    """``(file, line, what)`` for the whole tree at ``root`` (a checkout of this repository)."""
    modules, names, public = bundled_modules(root), bundled_names(root), set(cfn_core.__all__)
    found = []
    for path in sorted((root / "cfn_core").rglob("*.py")):
        if (root / "cfn_core" / "bench") in path.parents:
            continue  # the benchmark harness: its default matrix lists the bundled plugins
        rel = path.relative_to(root).as_posix()
        found += [(rel, line, what) for line, what in kernel_violations(path.read_text(), modules, names)]
    for package in sorted(root.glob("plugins/*/cfn_*/__init__.py")):
        own = package.parent.name
        for path in sorted(package.parent.rglob("*.py")):
            if path.name.startswith("test_") or "tests" in path.relative_to(package.parent).parts:
                continue
            rel = path.relative_to(root).as_posix()
            source = path.read_text()
            found += [(rel, line, what) for line, what in plugin_violations(source, own, modules - {own}, public)]
    return found


# ---------------------------------------------------------------------- the rule holds


def test_the_kernel_names_no_plugin_and_plugins_use_only_the_public_api():
    unexpected = [f"{f}:{line}: {what}" for f, line, what in layering_violations(ROOT) if (f, what) not in ALLOWED]
    assert not unexpected, "layering violations (docs/ARCHITECTURE.md, Layering):\n" + "\n".join(unexpected)


def test_the_allow_list_only_holds_violations_that_still_exist():
    found = {(f, what) for f, _line, what in layering_violations(ROOT)}
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"fixed: remove from ALLOWED in tests/test_layering.py: {stale}"


# ---------------------------------------------------------------------- the check can fail


def test_a_planted_violation_in_a_copy_of_the_tree_is_reported(tmp_path):
    """Plant the imports this rule was written against in a copy of the repository's sources."""
    copy = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests", "bench")
    shutil.copytree(ROOT / "cfn_core", copy / "cfn_core", ignore=shutil.ignore_patterns("__pycache__"))
    for dist in ROOT.glob("plugins/*/pyproject.toml"):
        shutil.copytree(dist.parent, copy / "plugins" / dist.parent.name, ignore=ignore)
    assert {(f, w) for f, _l, w in layering_violations(copy)} <= set(ALLOWED)  # the copy is as clean as the tree

    with open(copy / "cfn_core" / "cli.py", "a") as f:
        f.write('\n_EXTRA = ("cfn_core.bench.cli", "cfn_redis.cli")\n')
    with open(copy / "plugins" / "cfn-redis" / "cfn_redis" / "cli.py", "a") as f:
        f.write("\n\ndef _zygote():\n    from cfn_pool.zygote import Zygote\n    from cfn_core.agent import config_from_state\n")
    found = {(f, w) for f, _l, w in layering_violations(copy)}
    assert ("cfn_core/cli.py", "names cfn_redis") in found
    assert ("plugins/cfn-redis/cfn_redis/cli.py", "imports cfn_pool.zygote (another bundled plugin)") in found
    assert ("plugins/cfn-redis/cfn_redis/cli.py", "imports cfn_core.agent.config_from_state") in found


@pytest.mark.parametrize(
    "source, what",
    [
        ("from cfn_core.plugins import builtin_plugin_manager\n", "imports cfn_core.plugins.builtin_plugin_manager"),
        ("import cfn_core.process\n", "imports cfn_core.process"),
        ("from cfn_core import hookimpl, _EXPORTS\n", "imports cfn_core._EXPORTS"),
        ("import cfn_core\nx = cfn_core.agent.run_agent\n", "uses cfn_core.agent"),
        ("import cfn_pool\n", "imports cfn_pool (another bundled plugin)"),
        ("import importlib\nimportlib.import_module('cfn_pool.zygote')\n", "names cfn_pool (another bundled plugin)"),
    ],
)
def test_a_plugin_reaching_past_the_public_api_is_reported(source, what):
    found = [w for _line, w in plugin_violations(source, "cfn_redis", {"cfn_pool", "cfn_batch"}, set(cfn_core.__all__))]
    assert what in found


def test_what_a_plugin_may_import_is_not_reported():
    source = (
        '"""Uses cfn_pool.zygote, in a docstring: documentation may name anything."""\n'
        "from cfn_core import ShmBus, hookimpl, run_agent\n"
        "from cfn_core.hookspecs import hookspec\n"
        "import cfn_core\n"
        "from . import keys\n"
        "from cfn_redis.bus import RUN_STATE\n"
        "x = cfn_core.COORDINATOR_ID\n"
        'cmd = ["python", "-m", "cfn_core.agent"]  # the agent program is a command line, not an import\n'
    )
    assert plugin_violations(source, "cfn_redis", {"cfn_pool"}, set(cfn_core.__all__)) == []


def test_the_kernel_naming_a_plugin_is_reported_but_not_in_docs_or_help_text():
    modules, names = {"cfn_redis", "cfn_pool"}, {"redis", "pool"}
    assert kernel_violations("import cfn_redis.cli\n", modules, names) == [(1, "imports cfn_redis.cli")]
    assert kernel_violations("for m in ('cfn_redis.cli',): pass\n", modules, names) == [(1, "names cfn_redis")]
    assert kernel_violations("if 'pool' in enabled: pass\n", modules, names) == [(1, "names the plugin 'pool'")]
    clean = '"""cfn-pool forks from cfn_pool.zygote."""\nHELP = "e.g. --plugins pool,redis"  # cfn_redis\n'
    assert kernel_violations(clean, modules, names) == []


# ---------------------------------------------------------------------- the public API in one place


def test_the_plugin_guide_lists_exactly_what_cfn_core_exports():
    guide = (ROOT / "docs" / "PLUGIN_GUIDE.md").read_text()
    section = guide.split("\n## The public API\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    listed = [name for line in table for name in re.findall(r"`(\w+)`", line.split(" | ")[1])]
    assert sorted(listed) == sorted(cfn_core.__all__), "docs/PLUGIN_GUIDE.md 'The public API' differs from cfn_core.__all__"
    assert len(listed) == len(set(listed)), "a name is listed twice"


def test_every_exported_name_resolves():
    for name in cfn_core.__all__:
        assert getattr(cfn_core, name) is not None, name


def test_hookspec_annotations_name_public_types():
    """Every type in a hookspec's annotations is a cfn_core export (or from the standard library)."""
    import argparse

    namespace = {name: getattr(cfn_core, name) for name in cfn_core.__all__} | {"argparse": argparse}
    for name, func in vars(hookspecs).items():
        if name.startswith("cfn_") and hasattr(func, "cfn_spec"):
            hints = typing.get_type_hints(func, globalns=vars(hookspecs) | namespace)
            assert "return" in hints and set(hints) >= set(func.__code__.co_varnames[: func.__code__.co_argcount]), name


def test_an_agent_imports_what_it_did_before_and_no_coordinator():
    """The public names are imported on first use: a plugin's `from cfn_core import ...` costs agents nothing."""
    code = (
        "import sys, importlib, importlib.metadata as md\n"
        "import cfn_core.agent\n"
        "for ep in md.entry_points(group='cfn'):\n"
        "    importlib.import_module(ep.value.partition(':')[0])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('cfn_core'))))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout.split())
    assert not loaded & {"cfn_core.coordinator", "cfn_core.context", "cfn_core.report", "cfn_core.metrics", "cfn_core.cli", "cfn_core.forker"}, loaded
