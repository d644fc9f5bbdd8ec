"""Write docs/CONFIG.md, the cfn.toml reference, from the schema the loader validates with.

    python docs/gen_config_reference.py          # rewrite docs/CONFIG.md
    python docs/gen_config_reference.py --check  # exit 1 if docs/CONFIG.md is out of date

Tables: the kernel's (``cfn_core.config.KERNEL_SECTIONS``) and those of the plugins
bundled under ``plugins/`` (each one's ``cfn_settings`` hook, imported from the
installed distribution or, if it is not installed, from its source directory), so
the result depends on the repository, not on what happens to be installed.
tests/test_docs_config.py checks the file against the live loader.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tomllib
from pathlib import Path

import attrs
import tomli_w

from cfn_core.config import KERNEL_SECTIONS, describe_allowed, env_names

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "CONFIG.md"


def bundled_plugins() -> dict[str, tuple[str, Path]]:
    """``{entry-point name: (module, distribution directory)}`` for every plugin under plugins/."""
    out = {}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        for name, value in data.get("project", {}).get("entry-points", {}).get("cfn", {}).items():
            out[name] = (value, pyproject.parent)
    return out


def _import(value: str, directory: Path):
    modname, _, attr = value.partition(":")
    try:
        module = importlib.import_module(modname)
    except ImportError:
        sys.path.insert(0, str(directory))  # not installed: read it from its source directory
        try:
            module = importlib.import_module(modname)
        finally:
            sys.path.remove(str(directory))
    return getattr(module, attr) if attr else module


def plugin_feature_flags() -> dict[str, str]:
    """``{variable: plugin name}``: the feature flags the bundled plugins declare (``cfn_feature_flags``)."""
    plugins = bundled_plugins()
    flags = {}
    for name, (value, directory) in plugins.items():
        impl = getattr(_import(value, directory), "cfn_feature_flags", None)
        for var in (impl() or ()) if impl else ():
            flags[var] = name
    return dict(sorted(flags.items()))


def plugin_tables() -> dict[str, tuple[str, type]]:
    """``{table: (plugin name, settings class)}`` declared by the bundled plugins."""
    tables = {}
    for name, (value, directory) in bundled_plugins().items():
        impl = getattr(_import(value, directory), "cfn_settings", None)
        for table, cls in ((impl() or {}) if impl else {}).items():
            tables[table] = (name, cls)
    return dict(sorted(tables.items()))


def _default(fld):
    d = fld.default
    return d.factory() if isinstance(d, attrs.Factory) else d


def toml_value(value) -> str:
    """A value as it is written in cfn.toml (lists inline)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"k": value}).strip()[len("k = "):]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(table: str, cls: type, owner: str) -> list[str]:
    doc = (cls.__doc__ or "").strip().splitlines()
    summary = re.sub(r"^``\[[\w.-]+\]``:\s*", "", doc[0]) if doc else ""
    summary = summary[:1].upper() + summary[1:]
    if summary and not summary.endswith("."):
        summary += "."
    lines = [f"## [{table}]", "", f"{summary} Declared by {owner}.".strip()]
    lines += ["", "| key | default | allowed | environment | meaning |", "|---|---|---|---|---|"]
    for fld in attrs.fields(cls):
        env = ", ".join(f"`{n}`" for n in dict.fromkeys(env_names(table, fld)))
        lines.append(
            f"| `{fld.name}` | `{_cell(toml_value(_default(fld)))}` | {_cell(describe_allowed(fld))} | {env} | "
            f"{_cell(fld.metadata['help'])} |"
        )
    return lines + [""]


def render_roles() -> list[str]:
    """``[agents.<role>]``: a table per role, whose name the user chooses (no environment variables)."""
    from cfn_core.config import RESERVED_ROLE_NAMES, RoleSettings

    lines = [
        "## [agents.<role>]",
        "",
        "One table per role of a run with several kinds of agents (`[agents.planner]`, `[agents.coder]`,",
        "...; docs/USER_GUIDE.md \"Roles\"). Declared by the kernel (cfn-core). Without any, `[workload]` is",
        "the shorthand for one role named `worker` with `[workload] agents` agents (`agent-0001`, ...).",
        "",
        "| key | default | allowed | environment | meaning |",
        "|---|---|---|---|---|",
    ]
    for fld in attrs.fields(RoleSettings):
        lines.append(
            f"| `{fld.name}` | `{_cell(toml_value(_default(fld)))}` | {_cell(describe_allowed(fld))} | "
            f"`--set agents.<role>.{fld.name}=...` | {_cell(fld.metadata['help'])} |"
        )
    return lines + [
        "",
        "- A role's agents are `<role>-0001`, `<role>-0002`, ...; an agent runs its role's handler or",
        "  command. A role name is 1-40 letters, digits, `_` and `-`, starts with a letter, does not end",
        "  in `-<digits>` and is none of " + ", ".join(f"`{n}`" for n in sorted(RESERVED_ROLE_NAMES)) + ".",
        "- A role sets `handler` or `command`, not both; one that sets neither runs `[workload]`'s.",
        "  `timeout` and `max_attempts` at 0 are `[workload]`'s.",
        "- With roles, the number of agents is the sum of the counts. `[workload] agents`",
        "  (`cfn run --agents`, `CFN_AGENTS`) may be left out; set to anything but that sum, it is an",
        "  error that says to change a count instead (`--set agents.coder.count=20`). `[run] max_agents`",
        "  and the file-descriptor check apply to the sum.",
        "- A task given to `Coordinator.run` names its role (`Task(id, payload, role=\"coder\")`); one",
        "  that names none goes to `[workload] default_role`, by default the first role declared.",
        "  The tasks `cfn run` makes (`[workload] tasks`; 0: one per agent) are shared out over the",
        "  roles by their counts. Role settings have no environment variables: a role's name is the",
        "  user's, and environment names cannot hold every name a table can.",
        "",
    ]


def render_tasks() -> list[str]:
    """``[[tasks]]``: the entries of a workflow (an array of tables, checked by cfn_core.config.workflow_tasks)."""
    return [
        "## [[tasks]]",
        "",
        "A workflow: one `[[tasks]]` table per task, in any order; `cfn run` executes them as a task",
        'graph instead of rounds (docs/USER_GUIDE.md "Workflows: [[tasks]] in cfn.toml"). Declared by',
        "the kernel (cfn-core). No environment variables or `--set` keys: a workflow lives in its file.",
        "",
        "| key | default | allowed | meaning |",
        "|---|---|---|---|",
        "| `id` | (required) | a non-empty string, unique among the tasks | the task's id (`needs` names it, `cfn cancel RUN ID` cancels it) |",
        "| `payload` | none | any TOML value | what the handler gets (a command: on stdin, as JSON unless a string) |",
        "| `role` | `[workload] default_role` | a role of the run | the role whose agents may run it |",
        "| `needs` | `[]` | a list of task ids | tasks that must succeed first; the handler then gets `{\"payload\": ..., \"after\": {id: result}}` |",
        "",
        "- A cycle (`a -> b -> a`), an id that `needs` names but no task has, a duplicate id or an",
        "  unknown role is a configuration error naming the file and the task: `cfn run` exits 2.",
        "- A task whose need failed (or was cancelled) is skipped with the reason; the summary counts",
        "  failed, cancelled and skipped tasks apart.",
        "",
    ]


def render() -> str:
    lines = [
        "# cfn.toml reference",
        "",
        "<!-- Generated by `python docs/gen_config_reference.py` from the schema the loader uses; do not edit. -->",
        "",
        "`cfn run` reads `cfn.toml` from the current directory or the nearest parent that has one",
        "(or `[tool.cfn]` in a `pyproject.toml`; `--config PATH` names a file). Every key below can",
        "also be set by environment variable and on the command line. Precedence, highest first:",
        "",
        "1. the command line: `cfn run --agents 500`, or any key as `--set table.key=value`",
        "2. the environment: `CFN_<TABLE>_<KEY>` (and the extra names listed)",
        "3. `cfn.toml`",
        "4. the defaults below",
        "",
        "A value of the wrong type or outside its range, an unknown table or an unknown key stops",
        "`cfn` with one line that names the source (file, variable or flag), the key, the value and",
        "what is allowed (exit status 2). `cfn init` writes a commented file with every key at its",
        "default. Environment values are text: `true/false/1/0/yes/no/on/off` for booleans,",
        "comma-separated items for lists. A `CFN_*` variable that looks like a misspelt key",
        "(`CFN_POOL_SIZ`, `CFN_WORKLOAD_AGENT`) is reported with a warning and a did-you-mean.",
        "",
        "**Relative paths** resolve against the directory of the file that names them, as pytest",
        "resolves its ini-file paths against the ini file: `cfn run --config examples/echo/cfn.toml`",
        "from anywhere runs the same as `cfn run` inside `examples/echo`. A path given in the",
        "environment or on the command line resolves against the current directory. Every path is",
        "stored absolute, so a handler that changes directory does not lose the bus. This holds for",
        "`[bus] root`, `[run] metrics_file` and `[workload] directory`, and the last decides the rest:",
        "`[workload] handler` modules are imported from it first (before the current directory) and",
        "`[workload] command` runs in it, so `command = \"sh fake_llm.sh\"` finds the script next to",
        "its cfn.toml. It defaults to the cfn.toml's directory (the current directory when no file",
        "is read); set it (`--set workload.directory=.`) to run commands elsewhere.",
        "",
        "## plugins",
        "",
        "| key | default | allowed | environment | meaning |",
        "|---|---|---|---|---|",
        "| `plugins` | `[]` | a list of installed plugin names (`cfn plugins`), each may be `no:name` | "
        "`CFN_PLUGINS` (comma-separated) | optimization plugins to enable; empty: the baseline; "
        "`no:name` blocks one |",
        "",
        "Feature flags add or remove one plugin from the list (the original plan's names; each",
        "plugin declares its own with the `cfn_feature_flags` hook, docs/PLUGIN_GUIDE.md):",
        "",
        "| variable | plugin | `true` / `1` | `false` / `0` |",
        "|---|---|---|---|",
    ]
    for var, name in plugin_feature_flags().items():
        lines.append(f"| `{var}` | `{name}` | adds `{name}` | removes `{name}` |")
    lines += [
        "| `CFN_DISABLE_PLUGINS` | comma-separated names | | each becomes `no:name` |",
        "",
        "A blocked plugin stays blocked: `no:name` in any layer (cfn.toml, `CFN_PLUGINS`,",
        "`CFN_DISABLE_PLUGINS`, `--plugins`) wins over every layer that enables the name, a",
        "feature flag set to `true` or `--plugins` naming it included. That is the kill switch",
        "for rolling a plugin back in an incident.",
        "",
        "The names `baseline` and `none` in the list are ignored (`--plugins baseline` runs the",
        "baseline). An unknown name is an error that lists the installed plugins.",
        "",
    ]
    for table, cls in KERNEL_SECTIONS.items():
        lines += render_table(table, cls, "the kernel (cfn-core)")
    lines += render_roles()
    lines += render_tasks()
    for table, (plugin, cls) in plugin_tables().items():
        page = ROOT / "docs" / "plugins" / f"{plugin}.md"
        owner = f"the bundled `{plugin}` plugin" + (f" (see [plugins/{plugin}.md](plugins/{plugin}.md))" if page.exists() else "")
        lines += render_table(table, cls, owner)
    lines += [
        "## Tables of other plugins",
        "",
        "A third-party plugin declares its own tables with the `cfn_settings` hook; they are",
        "validated and read from `CFN_<TABLE>_<KEY>` exactly like the ones above, and `cfn init`",
        "lists them when the plugin is installed. Example: `[tracer]` of",
        "[examples/third-party-plugin](../examples/third-party-plugin/README.md).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
