"""Configuration: cfn.toml + CFN_* environment + command-line overrides, validated.

Precedence, highest first: command line > environment > cfn.toml > default.

Every table is an ``attrs`` class whose fields are declared with :func:`setting`
(default, help text, range or choices, extra environment names).  The kernel
owns ``plugins``, ``[workload]``, ``[bus]`` and ``[run]``; each plugin declares
its own table through the ``cfn_settings`` hook.  The same schema drives the
loader, the error messages, ``cfn init`` and the reference in docs/, so they
cannot disagree.

Environment: every key is ``CFN_<TABLE>_<KEY>`` (``CFN_POOL_SIZE``,
``CFN_WORKLOAD_AGENTS``); a setting may declare more names (the plan's
``CFN_SPAWN_PARALLELISM``, ``CFN_BATCH_TIMEOUT``).  ``CFN_PLUGINS`` replaces the
plugin list; a feature flag (a variable a plugin declares with the
``cfn_feature_flags`` hook, e.g. ``CFN_ENABLE_POOLING``) adds or removes one
plugin; ``CFN_DISABLE_PLUGINS`` blocks plugins, and a block beats every layer
that enables.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs
from attrs import define, field

from .errors import ConfigError, did_you_mean

log = logging.getLogger("cfn")

CONFIG_NAME = "cfn.toml"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def setting(
    default: Any, help: str, *, env: tuple[str, ...] = (), min=None, max=None, choices=None, join=None, path=False, item=None
):
    """Declare one configuration key (an ``attrs`` field with the metadata the loader uses).

    :param default: the value when nobody sets it; its type is the key's type.  A list's
        items are strings, or integers when the default's items are integers.
    :param help: one line for ``cfn init`` and the docs.
    :param env: extra environment variable names besides ``CFN_<TABLE>_<KEY>``.
    :param min: smallest allowed number.  :param max: largest allowed number.
    :param choices: the allowed values of a string key.  (For a list: of each item.)
    :param join: for a list of strings, an item may itself be a list of strings, stored
        joined with this separator (``[["pool", "batch"]]`` -> ``("pool+batch",)``).
    :param path: the string is a file or directory: :func:`load_config` makes a relative
        one absolute, against the directory of the file that set it (cfn.toml), or the
        current directory when it came from the environment or the command line.
    :param item: the item type of a list whose default is empty (``int``); otherwise it
        follows the default's items.
    """
    meta = {"help": help, "env": tuple(env), "min": min, "max": max, "choices": choices, "join": join, "path": path, "item": item}
    if isinstance(default, (list, tuple)):
        return field(factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@define(frozen=True)
class WorkloadSettings:
    """``[workload]``: what one coordination does."""

    agents: int = setting(10, "agents in one coordination", env=("CFN_AGENTS",), min=1, max=100_000)
    rounds: int = setting(1, "coordinations in a row with the same configuration (later rounds show reuse)", min=1, max=100_000)
    tasks: int = setting(0, "tasks per round; 0 means one task per agent", min=0, max=10_000_000)
    topology: str = setting("star", "star: coordinator<->agents only; mesh: agents also message each other", choices=("star", "mesh"))
    messages_per_agent: int = setting(0, "peer messages each agent sends to other agents (mesh)", min=0, max=1_000_000)
    handler: str = setting("cfn_core.handlers:echo", "module:function called in the agent with each task's payload")
    command: str = setting("", "shell command run per task (payload on stdin, stdout is the result); replaces handler")
    payload_bytes: int = setting(64, "size of each task's payload string", min=0, max=1 << 30)
    timeout: float = setting(
        60.0,
        "seconds one task may take; then a handler's agent is killed and the task retried (an attempt), "
        "a command is killed with everything it started and its task fails (no retry)",
        min=0.001,
        max=86_400.0,
    )
    max_attempts: int = setting(3, "agent incarnations a task may use up (crashes, handler timeouts) before it is reported failed", min=1, max=100)
    prefetch: int = setting(
        1,
        "tasks one agent may hold at once (sent, not yet answered) when a pooling plugin hands them out, and per "
        "agent of a role in Coordinator.submit; raise it (e.g. 16) for many short tasks, so an agent never waits for the next",
        env=("CFN_PREFETCH",),
        min=1,
        max=100_000,
    )
    cancel_grace: float = setting(
        5.0,
        "seconds a cancelled task's agent has to stop it (a command is killed at once, a Python handler gets "
        "Cancelled at its next agent call) before the agent is killed and replaced",
        min=0.0,
        max=3600.0,
    )
    # failure policy (docs/LLM_SWARMS.md): which failures are retried, which are final
    retry_on_exit: tuple = setting(
        (), "exit codes of a command that are retried (with backoff, charged as an attempt, up to max_attempts)", min=1, max=255, item=int
    )
    fatal_on_exit: tuple = setting((), "exit codes of a command that fail its task at once, never retried", min=1, max=255, item=int)
    on_other_exit: str = setting(
        "fail", "another non-zero exit of a command: fail (the task fails) or retry (as retry_on_exit)", choices=("fail", "retry")
    )
    rate_limit_exit: tuple = setting(
        (), "exit codes of a command that mean 'rate limited': re-queued with backoff, not charged as an attempt", min=1, max=255, item=int
    )
    rate_limit_pattern: str = setting(
        "", "regular expression: a failed command whose stdout or stderr matches it was rate limited (e.g. '429|rate.limit'); empty: off"
    )
    max_rate_limited: int = setting(50, "times one task may be re-queued as rate limited before it fails", min=1, max=100_000)
    retry_backoff: float = setting(0.5, "seconds of the first retry's backoff; doubled per retry, with jitter", min=0.0, max=3600.0)
    retry_backoff_max: float = setting(30.0, "longest backoff of a retry, seconds", min=0.0, max=86_400.0)
    stall_seconds: float = setting(
        0.0,
        "a command silent (no stdout/stderr), or a handler's agent silent (no agent.status, no message to the coordinator), "
        "this long is marked stalled (status, event log, cfn top); 0: off",
        min=0.0,
        max=86_400.0,
    )
    stall_kill_seconds: float = setting(
        0.0, "seconds a stalled command (or handler's agent) may stay silent before it is killed and its task retried (an attempt); 0: at once", min=0.0, max=86_400.0
    )
    max_tasks: int = setting(
        0, "tasks an agent process runs before it is replaced by a fresh one under its id (recycling); 0: no limit", min=0, max=1 << 30
    )
    max_rss_mb: int = setting(
        0, "resident memory (MiB) above which an agent process is replaced after its current task; 0: no limit", min=0, max=1 << 30
    )
    command_max_rss_mb: int = setting(
        0, "address-space cap of each command, MiB (RLIMIT_AS); exceeding it fails the task as 'out of memory'; 0: off", min=0, max=1 << 30
    )
    seed: int = setting(0, "seed for the mesh peer choice (same seed, same traffic)", min=0, max=2**31 - 1)
    default_role: str = setting(
        "",
        "role of a task given to Coordinator.run without one; empty: the first [agents.<role>] table "
        "(worker, the only role, without them)",
    )
    directory: str = setting(
        "",
        "directory handler modules are imported from (first) and commands run in; "
        "empty: the directory of the cfn.toml (the current directory without one)",
        path=True,
    )
    host: str = setting(
        "process",
        "how agents run: process (one OS process each) or async (asyncio tasks inside host processes; docs/HOSTING.md)",
        choices=("process", "async"),
    )
    hosts: int = setting(0, "host processes for async agents; 0: one per core", min=0, max=1024)
    loop_lag: float = setting(
        0.25, "seconds a host's event loop may lag (a handler blocking it) before it is reported and counted", min=0.001, max=3600.0
    )


@define(frozen=True)
class RoleSettings:
    """``[agents.<role>]``: one role of a run with several kinds of agents (cfn_core.roles)."""

    count: int = setting(1, "agents of this role", min=1, max=100_000)
    handler: str = setting(
        "", "module:function its agents call with each task's payload; empty (and no command): [workload]'s handler or command"
    )
    command: str = setting("", "shell command its agents run per task (payload on stdin, stdout is the result); not with handler")
    timeout: float = setting(0.0, "seconds one task of this role may take (see [workload] timeout); 0: [workload] timeout", min=0.0, max=86_400.0)
    max_attempts: int = setting(0, "agent incarnations a task of this role may use up; 0: [workload] max_attempts", min=0, max=100)
    host: str = setting("", "process or async (see [workload] host); empty: [workload] host", choices=("", "process", "async"))
    hosts: int = setting(0, "host processes for this role's async agents; 0: [workload] hosts", min=0, max=1024)


#: ``[agents.<role>]`` role names: an identifier (an agent id is ``<role>-0001``, which
#: must itself be a valid agent id, file name and environment value)
ROLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")
#: names a role may not have: the prefix of the one-role shorthand's ids (``agent-0001``),
#: the coordinator, and words a message destination may come to mean (every agent, none)
RESERVED_ROLE_NAMES = frozenset({"agent", "coordinator", "all", "any", "none", "self"})


@define(frozen=True)
class BusSettings:
    """``[bus]``: the embedded /dev/shm transport."""

    root: str = setting("", "directory for run directories; empty: /dev/shm, or the temp dir without it", path=True)
    max_message_bytes: int = setting(1 << 20, "largest encoded message", min=256, max=1 << 30)
    inbox_depth: int = setting(1000, "unread messages an inbox may hold before senders wait; 0: unlimited", min=0, max=10_000_000)


@define(frozen=True)
class RunSettings:
    """``[run]``: how the coordinator behaves."""

    strict: bool = setting(False, "a failing optimization plugin stops the run instead of falling back to the baseline")
    max_agents: int = setting(10_000, "most agents one run may start (a guard against typos)", min=1, max=1_000_000)
    spawn_timeout: float = setting(30.0, "seconds an agent may take to become ready", min=0.01, max=3600.0)
    shutdown_timeout: float = setting(5.0, "seconds agents get to exit before they are killed", min=0.01, max=3600.0)
    metrics_port: int = setting(0, "serve Prometheus /metrics on this port during the run; 0: off", min=0, max=65535)
    metrics_file: str = setting("", "write the Prometheus text format to this file at the end; empty: off", path=True)


@define(frozen=True)
class BenchSettings:
    """``[bench]``: the benchmark matrix of `cfn bench` and `pytest -m bench` (docs/BENCHMARKS.md)."""

    agents: tuple = setting((100, 200, 300, 500), "agent counts of the matrix", min=1, max=100_000)
    combinations: tuple = setting(
        ("default",),
        "plugin combinations: default (baseline, each plugin alone, all combined), all (every subset), "
        "each, combined, baseline, or explicit ones such as pool+batch",
        join="+",
    )
    plugins: tuple = setting((), "plugins the default/all/each/combined combinations are built from; empty: the bundled ones except the transport (redis)")
    workloads: tuple = setting(("star",), "workloads of the matrix", choices=("star", "mesh"))
    mesh_messages: int = setting(5, "peer messages per agent in the mesh workload", min=1, max=1_000_000)
    rounds: int = setting(1, "coordinations per repetition (rounds after the first show warm reuse)", min=1, max=1000)
    repetitions: int = setting(3, "timed repetitions per cell (each one a fresh Coordinator)", min=1, max=1000)
    cell_budget: float = setting(60.0, "seconds after which a cell stops repeating (one repetition always runs); 0: no limit", min=0.0, max=86_400.0)
    references: bool = setting(True, "also time concurrent.futures.ProcessPoolExecutor, multiprocessing.Process+Pipe and the fork floor (os.fork + one pipe message)")
    target_seconds: float = setting(10.0, "the plan's target: one coordination at the largest N takes less than this", min=0.0, max=86_400.0)
    min_delivery: float = setting(0.90, "the plan's delivery floor", min=0.0, max=1.0)
    min_improvement: float = setting(5.0, "the plan's target gain of all plugins combined over the baseline", min=0.0, max=1e9)
    bar_seconds: float = setting(0.6, "our own bar: one cold coordination at the largest N", min=0.0, max=86_400.0)
    bar_improvement: float = setting(20.0, "our own bar: gain of all plugins combined", min=0.0, max=1e9)
    regression: float = setting(0.10, "--compare: a cell slower than the old report by more than this fraction fails", min=0.0, max=100.0)
    output: str = setting("bench-report", "path prefix of the report files (.json, .md, .png)")
    parallel: bool = setting(False, "pytest -n: let timing cells overlap (throughput over precision)")


#: the kernel's own tables
KERNEL_SECTIONS: dict[str, type] = {"workload": WorkloadSettings, "bus": BusSettings, "run": RunSettings, "bench": BenchSettings}


@define(frozen=True)
class Config:
    """A validated configuration.  ``sections`` holds every table, kernel and plugin."""

    plugins: tuple[str, ...] = ()
    sections: Mapping[str, Any] = field(factory=dict)
    path: str | None = None
    #: the ``[agents.<role>]`` tables, in the order the file declares them; empty: the
    #: ``[workload]`` shorthand (one role, ``worker``).  See :mod:`cfn_core.roles`.
    roles: Mapping[str, RoleSettings] = field(factory=dict)
    #: the ``[[tasks]]`` of a workflow, in file order (empty: ``cfn run`` runs rounds)
    tasks: tuple["WorkflowTask", ...] = ()

    @property
    def workload(self) -> WorkloadSettings:
        return self.sections["workload"]

    @property
    def bus(self) -> BusSettings:
        return self.sections["bus"]

    @property
    def run(self) -> RunSettings:
        return self.sections["run"]

    def section(self, name: str):
        """The settings object of table ``name`` (a plugin's own table)."""
        return self.sections[name]

    def enabled(self) -> list[str]:
        """Plugin names switched on (``no:name`` entries removed)."""
        blocked = {p[3:] for p in self.plugins if p.startswith("no:")}
        return [p for p in self.plugins if not p.startswith("no:") and p not in blocked]

    def blocked(self) -> list[str]:
        return [p[3:] for p in self.plugins if p.startswith("no:")]

    def to_dict(self) -> dict:
        """Plain data (TOML/JSON-able) that :func:`config_from_dict` turns back into this config."""
        out: dict[str, Any] = {"plugins": list(self.plugins)}
        for name, obj in self.sections.items():
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(obj).items()}
        if self.roles:
            out["agents"] = {name: attrs.asdict(role) for name, role in self.roles.items()}
        if self.tasks:
            out["tasks"] = [t.to_dict() for t in self.tasks]
        return out

    def evolve(self, **tables: dict) -> "Config":
        """A copy with some keys of some tables replaced, validated like a file.

        ``agents={"coder": {"count": 20}}`` adds or changes roles (``[agents.<role>]``).
        """
        data = self.to_dict()
        if "agents" in tables and "agents" not in tables.get("workload", {}):
            data["workload"].pop("agents", None)  # with roles it is their total, counted again
        for table, values in tables.items():
            if table == "plugins":
                data["plugins"] = list(values)
            elif table == "agents":  # {role: {key: value}}
                for role, keys in values.items():
                    data.setdefault("agents", {}).setdefault(role, {}).update(keys)
            else:
                data.setdefault(table, {}).update(values)
        return config_from_dict(data, source=self.path or "<evolve>", path=self.path)


# ---------------------------------------------------------------------- schema helpers


def schemas(plugin_schemas: Mapping[str, type] | None = None) -> dict[str, type]:
    """Every table the loader accepts: the kernel's plus the installed plugins'."""
    out = dict(KERNEL_SECTIONS)
    if plugin_schemas is None:
        from .plugins import installed_settings

        plugin_schemas = installed_settings()
    out.update(plugin_schemas)
    return out


def feature_flags() -> dict[str, str]:
    """``{environment variable: plugin name}``: the feature flags the installed plugins declare (``cfn_feature_flags``)."""
    from .plugins import installed_feature_flags

    return installed_feature_flags()


def env_names(table: str, fld: attrs.Attribute) -> tuple[str, ...]:
    """Environment variable names of one key, generic name first."""
    return (f"CFN_{table.upper()}_{fld.name.upper()}",) + tuple(fld.metadata.get("env", ()))


def describe_allowed(fld: attrs.Attribute) -> str:
    """'an integer from 1 to 100000', 'one of star, mesh', ... for error messages and docs."""
    meta = fld.metadata
    typ = type(fld.default) if fld.default is not attrs.NOTHING else tuple
    if isinstance(fld.default, attrs.Factory) or typ is tuple:
        kind = "a list of integers" if _item_type(fld) is int else "a list of strings"
        if meta.get("join"):
            kind += f" (an item may be a list of strings, joined with {meta['join']!r})"
        if meta.get("choices"):
            return f"{kind}, each one of " + ", ".join(meta["choices"])
        if meta.get("min") is not None and meta.get("max") is not None:
            return f"{kind}, each from {meta['min']} to {meta['max']}"
        return kind
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    return kind


def _default(fld: attrs.Attribute):
    d = fld.default
    return d.factory() if isinstance(d, attrs.Factory) else d


def _item_type(fld: attrs.Attribute) -> type:
    """The item type of a list key: int when the default's items are ints, else str."""
    if fld.metadata.get("item") is not None:
        return fld.metadata["item"]
    d = _default(fld)
    return int if d and isinstance(d[0], int) and not isinstance(d[0], bool) else str


def _coerce(value: Any, fld: attrs.Attribute, where: str, from_text: bool):
    typ = type(_default(fld))
    meta = fld.metadata
    given = value  # the error shows what the user wrote, not what it was converted to

    def bad():
        return ConfigError(f"{where} = {given!r}: must be {describe_allowed(fld)}")

    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            if typ is bool:
                low = text.lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError
                value = low in _TRUE
            elif typ is int:
                value = int(text)
            elif typ is float:
                value = float(text)
            elif typ is tuple:
                value = tuple(_item_type(fld)(p.strip()) for p in text.split(",") if p.strip())
        except ValueError:
            raise bad() from None
    if typ is bool:
        if not isinstance(value, bool):
            raise bad()
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad()
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise bad()
    elif typ is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        join, item_type = meta.get("join"), _item_type(fld)
        if join:
            value = [join.join(v) if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) else v for v in value]
        if not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
            raise bad()
        value = tuple(value)
    items = value if typ is tuple else (value,)
    lo, hi = meta.get("min"), meta.get("max")
    if any((lo is not None and v < lo) or (hi is not None and v > hi) for v in items):
        raise bad()
    for v in items:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{where} = {value!r}: must be {describe_allowed(fld)}{did_you_mean(str(v), meta['choices'])}")
    return value


def _build_section(table: str, cls: type, values: Mapping[str, tuple[Any, str, bool]]):
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = {}
    for key, (value, source, from_text) in values.items():
        fld = fields.get(key)
        if fld is None:
            raise ConfigError(
                f"{source}: unknown key {key!r} in [{table}]{did_you_mean(key, fields)}; "
                f"valid keys: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(value, fld, f"{source}: [{table}] {key}", from_text)
    return cls(**kwargs)


# ---------------------------------------------------------------------- loading


def find_config(start: str | os.PathLike | None = None) -> tuple[Path, dict] | None:
    """Find cfn.toml (or pyproject.toml with [tool.cfn]) from ``start`` upward, like pytest's rootdir."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / CONFIG_NAME
        if candidate.is_file():
            return candidate, read_toml(candidate)
        pyproject = d / "pyproject.toml"
        if pyproject.is_file():
            table = tool_cfn_table(read_toml(pyproject), pyproject)
            if table is not None:
                return pyproject, table
    return None


def tool_cfn_table(data: dict, path: Path) -> dict | None:
    """The ``[tool.cfn]`` table of a parsed pyproject.toml, None when there is none.

    :raises ConfigError: when ``tool`` or ``tool.cfn`` is there but is not a table.
    """
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: tool = {tool!r}: must be a table ([tool])")
    if "cfn" not in tool:
        return None
    if not isinstance(tool["cfn"], dict):
        raise ConfigError(f"{path}: [tool] cfn = {tool['cfn']!r}: must be a table ([tool.cfn]) holding cfn's settings")
    return tool["cfn"]


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a syntax error names the file, line and column."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_config(
    path: str | os.PathLike | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    plugin_schemas: Mapping[str, type] | None = None,
    flags: Mapping[str, str] | None = None,
    discover: bool = True,
) -> Config:
    """Load and validate the configuration.

    :param path: a cfn.toml or pyproject.toml; None: discover from the current directory.
    :param overrides: command-line values, ``{"workload.agents": "500", "plugins": "pool,batch"}``.
    :param env: the environment to read CFN_* from (default ``os.environ``).
    :param plugin_schemas: plugin tables (default: every installed plugin's).
    :param flags: feature flags, ``{variable: plugin name}`` (default: every installed
        plugin's, see :func:`feature_flags`).
    :param discover: look for cfn.toml upward when ``path`` is None.
    """
    env = os.environ if env is None else env
    data: dict = {}
    source = "defaults"
    cfg_path = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        data = read_toml(p)
        if p.name == "pyproject.toml":
            table = tool_cfn_table(data, p)
            if table is None:  # named on purpose: running on defaults would hide the mistake
                raise ConfigError(f"--config {path}: has no [tool.cfn] table (cfn reads [tool.cfn] from a pyproject.toml)")
            data = table
        cfg_path, source = str(p), str(p)
    elif discover:
        found = found_path = None
        found = find_config()
        if found:
            found_path, data = found
            cfg_path = source = str(found_path)

    all_schemas = schemas(plugin_schemas)
    flags = feature_flags() if flags is None else flags
    plugins = _plugins_from(data.get("plugins", []), source)
    # `no:name` is a kill switch: once any layer blocks a plugin, no layer re-enables it
    # (a feature flag set to true, --plugins naming it, CFN_PLUGINS), so a rollback
    # written anywhere holds during an incident
    blocked = _blocks(plugins)
    tables: dict[str, dict[str, tuple[Any, str, bool]]] = {name: {} for name in all_schemas}
    role_tables: dict[str, tuple[str, dict[str, tuple[Any, str, bool]]]] = {}
    for key, value in data.items():
        if key in ("plugins", "tasks"):
            continue
        if key == "agents":
            role_tables = _role_tables(value, source)
            continue
        if key not in all_schemas:
            raise ConfigError(
                f"{source}: unknown table or key {key!r}{did_you_mean(key, [*all_schemas, 'agents'])}; "
                f"valid: plugins, {', '.join('[' + t + ']' for t in all_schemas)}, [agents.<role>]"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be a table ([{key}]), not {type(value).__name__}")
        for k, v in value.items():
            tables[key][k] = (v, source, False)

    # environment
    warn_unknown_env(env, all_schemas, flags)
    if env.get("CFN_PLUGINS") is not None:
        plugins = _plugins_from(env["CFN_PLUGINS"], "environment variable CFN_PLUGINS")
        blocked += _blocks(plugins)
    for var, name in sorted(flags.items()):  # several flags on: the list order is the variables' order
        if var in env:
            flag = env[var].strip().lower()
            if flag not in _TRUE | _FALSE:
                raise ConfigError(f"environment variable {var} = {env[var]!r}: must be true or false")
            # off just removes the name: a flag set to false must not require the plugin installed
            plugins = [p for p in plugins if p != name]
            if flag in _TRUE:
                plugins.append(name)
    if env.get("CFN_DISABLE_PLUGINS"):
        blocked += _plugins_from(env["CFN_DISABLE_PLUGINS"], "environment variable CFN_DISABLE_PLUGINS")
    for table, cls in all_schemas.items():
        for fld in attrs.fields(cls):
            for var in env_names(table, fld):
                if var in env:
                    tables[table][fld.name] = (env[var], f"environment variable {var}", True)
                    break

    # command line
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if dotted == "plugins":
            plugins = _plugins_from(value, "command line --plugins")
            blocked += _blocks(plugins)
            continue
        table, _, key = dotted.partition(".")
        if table == "agents":  # agents.ROLE.KEY: a role's key (a new ROLE adds a role)
            role, _, role_key = key.rpartition(".")
            where = f"command line {dotted}"
            if not role or not role_key:
                raise ConfigError(f"{where}: a role's setting is agents.ROLE.KEY, e.g. --set agents.coder.count=20")
            role_tables.setdefault(role, (where, {}))[1][role_key] = (value, where, isinstance(value, str))
            continue
        if table not in all_schemas or not key:
            raise ConfigError(
                f"command line: unknown setting {dotted!r}{did_you_mean(table, all_schemas)}; "
                f"use TABLE.KEY with TABLE one of {', '.join(all_schemas)}"
            )
        tables[table][key] = (value, f"command line {dotted}", isinstance(value, str))

    _resolve_paths(tables, all_schemas, file_source=source if cfg_path else None, file_dir=cfg_path and Path(cfg_path).parent)
    if cfg_path and tables["workload"].get("directory", ("",))[0] == "":
        # handler modules and commands are found next to the cfn.toml that names them
        tables["workload"]["directory"] = (str(Path(cfg_path).resolve().parent), source, False)
    sections = {name: _build_section(name, cls, tables[name]) for name, cls in all_schemas.items()}
    roles = _build_roles(role_tables)
    _apply_roles(sections, roles, tables["workload"])
    _check_failure_policy(sections["workload"], tables["workload"])
    enabled = [p for p in dict.fromkeys(plugins) if not p.startswith("no:") and p not in blocked]
    return Config(
        plugins=tuple(enabled + [f"no:{p}" for p in dict.fromkeys(blocked)]), sections=sections, path=cfg_path, roles=roles,
        tasks=workflow_tasks(data.get("tasks", []), source, roles),
    )


# ---------------------------------------------------------------------- roles ([agents.<role>])


def _role_tables(value: Any, source: str) -> dict[str, tuple[str, dict[str, tuple[Any, str, bool]]]]:
    """The raw ``[agents.<role>]`` tables of one source: ``{role: (source, {key: entry})}``."""
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: agents = {value!r}: must be tables of roles, e.g. [agents.coder] with count = 20 "
            "(the number of agents of the one-role shorthand is [workload] agents)"
        )
    out = {}
    for role, keys in value.items():
        if not isinstance(keys, dict):
            raise ConfigError(
                f"{source}: [agents] {role} = {keys!r}: [agents] holds one table per role, "
                "e.g. [agents.coder] with count = 20 and handler or command"
            )
        out[role] = (source, {k: (v, source, False) for k, v in keys.items()})
    return out


def check_role_name(name: Any, source: str) -> str:
    """Return ``name`` if it may name a role (``[agents.<name>]``), else raise ConfigError."""
    if not isinstance(name, str) or not ROLE_NAME_RE.match(name) or re.search(r"-[0-9]+$", name):
        raise ConfigError(
            f"{source}: [agents.{name}]: role name {name!r} is not allowed: use 1-40 letters, digits, '_' and '-', "
            "starting with a letter and not ending in '-<digits>' (its agents are named <role>-0001, <role>-0002, ...)"
        )
    if name.lower() in RESERVED_ROLE_NAMES:
        raise ConfigError(
            f"{source}: [agents.{name}]: {name!r} is a reserved name ({', '.join(sorted(RESERVED_ROLE_NAMES))}); "
            "give the role another name"
        )
    return name


def _build_roles(raw: Mapping[str, tuple[str, Mapping[str, tuple[Any, str, bool]]]]) -> dict[str, RoleSettings]:
    """Validate the ``[agents.<role>]`` tables (names, keys, values, handler xor command)."""
    roles: dict[str, RoleSettings] = {}
    folded: dict[str, str] = {}
    for name, (source, values) in raw.items():
        check_role_name(name, source)
        twin = folded.setdefault(name.lower(), name)
        if twin != name:  # coder-0001 and Coder-0001 would be told apart by case alone
            raise ConfigError(f"{source}: [agents.{name}] and [agents.{twin}] differ only in case; give one another name")
        role = _build_section(f"agents.{name}", RoleSettings, values)
        if role.handler and role.command:
            raise ConfigError(
                f"{source}: [agents.{name}] sets both handler = {role.handler!r} and command = {role.command!r}: "
                "give one (a role with neither runs [workload]'s handler or command)"
            )
        roles[name] = role
    return roles


def _apply_roles(sections: dict, roles: Mapping[str, RoleSettings], workload: Mapping[str, tuple[Any, str, bool]]) -> None:
    """Reconcile ``[workload]`` with the roles: ``agents`` is their total, ``default_role`` one of them.

    With roles, every role's ``count`` says how many of its agents run, so ``[workload]
    agents`` (``cfn run --agents``, ``CFN_AGENTS``) may only repeat the total: any other
    number would have to be spread over the roles by a rule nobody asked for.
    """
    w = sections["workload"]
    if roles:
        total = sum(r.count for r in roles.values())
        given = workload.get("agents")
        if given is not None and w.agents != total:
            first = next(iter(roles))
            raise ConfigError(
                f"{given[1]}: [workload] agents = {given[0]!r}, but the roles "
                f"({', '.join(f'[agents.{n}] count = {r.count}' for n, r in roles.items())}) make {total} agents: "
                f"with [agents.<role>] tables each role's count says how many of its agents run; leave [workload] "
                f"agents out, or change a count (cfn run --set agents.{first}.count=N)"
            )
        sections["workload"] = attrs.evolve(w, agents=total)
    names = list(roles) or ["worker"]
    if w.default_role and w.default_role not in names:
        value, source, _ = workload["default_role"]
        raise ConfigError(
            f"{source}: [workload] default_role = {value!r} is not a role of this run{did_you_mean(w.default_role, names)}; "
            f"roles: {', '.join(names)}"
        )


def _check_failure_policy(w: WorkloadSettings, given: Mapping[str, tuple[Any, str, bool]]) -> None:
    """The exit-code lists of ``[workload]`` name each code once, and the pattern compiles."""

    def where(key: str) -> str:
        return given[key][1] if key in given else "[workload]"

    lists = ("retry_on_exit", "fatal_on_exit", "rate_limit_exit")
    for i, a in enumerate(lists):
        for b in lists[i + 1 :]:
            both = sorted(set(getattr(w, a)) & set(getattr(w, b)))
            if both:
                raise ConfigError(
                    f"{where(b)}: [workload] {b} = {list(getattr(w, b))!r}: exit code(s) {', '.join(map(str, both))} "
                    f"also in {a}; a code may be in one of {', '.join(lists)}"
                )
    if w.rate_limit_pattern:
        try:
            re.compile(w.rate_limit_pattern)
        except re.error as exc:
            raise ConfigError(
                f"{where('rate_limit_pattern')}: [workload] rate_limit_pattern = {w.rate_limit_pattern!r}: "
                f"not a regular expression ({exc})"
            ) from None
    if w.retry_backoff_max < w.retry_backoff:
        raise ConfigError(
            f"{where('retry_backoff_max')}: [workload] retry_backoff_max = {w.retry_backoff_max:g} is below "
            f"retry_backoff = {w.retry_backoff:g}"
        )


def _blocks(plugins: list[str]) -> list[str]:
    """The names a plugin list blocks (its ``no:name`` entries)."""
    return [p[3:] for p in plugins if p.startswith("no:")]


def _resolve_paths(tables: dict, all_schemas: Mapping[str, type], *, file_source: str | None, file_dir) -> None:
    """Make relative path settings absolute, against the file that set them, else the current directory.

    As pytest resolves its ini-file paths against the ini file and command-line paths
    against the invocation directory: a cfn.toml means the same wherever `cfn` runs,
    and a path stays valid when a handler changes directory.
    """
    for table, cls in all_schemas.items():
        for fld in attrs.fields(cls):
            entry = tables[table].get(fld.name)
            if not fld.metadata.get("path") or entry is None:
                continue
            value, source, from_text = entry
            if not isinstance(value, str) or not value.strip() or os.path.isabs(value):
                continue  # wrong types are reported by the validation
            base = Path(file_dir) if file_source is not None and source == file_source else Path.cwd()
            tables[table][fld.name] = (os.path.normpath(os.path.join(base.resolve(), value)), source, from_text)


#: CFN_* variables read outside the schema (besides the plugins' feature flags)
_OTHER_ENV = ("CFN_PLUGINS", "CFN_DISABLE_PLUGINS")
_warned_env: set[str] = set()


def warn_unknown_env(
    env: Mapping[str, str], all_schemas: Mapping[str, type], flags: Mapping[str, str] | None = None
) -> None:
    """Warn (once per process) about a CFN_* variable that looks like a misspelt setting.

    Only names under a table's prefix (``CFN_POOL_SIZ``) or close to a real name are
    reported: other programs (and cfn's own agents) use CFN_* variables of their own.
    A ``CFN_ENABLE_*`` variable that no installed plugin declares is reported too (a
    typo, or the flag of a plugin that is not installed): it would change nothing.

    :param flags: the installed plugins' feature flags (``{variable: plugin}``).
    """
    flags = flags or {}
    known = set(_OTHER_ENV) | set(flags)
    for table, cls in all_schemas.items():
        for fld in attrs.fields(cls):
            known.update(env_names(table, fld))
    prefixes = tuple(f"CFN_{t.upper()}_" for t in all_schemas)
    for var in sorted(env):
        if not var.startswith("CFN_") or var in known or var in _warned_env:
            continue
        hint = did_you_mean(var, sorted(known))
        if var.startswith("CFN_ENABLE_"):
            _warned_env.add(var)
            log.warning(
                "cfn: warning: environment variable %s is not the feature flag of an installed plugin%s; ignored "
                "(feature flags: %s)",
                var,
                hint,
                ", ".join(sorted(flags)) or "none",
            )
            continue
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.85)
        if not close and not var.startswith(prefixes):
            continue
        _warned_env.add(var)
        log.warning(
            "cfn: warning: environment variable %s is not a cfn setting%s; ignored (every key of [table] is CFN_<TABLE>_<KEY>)",
            var,
            hint,
        )


def config_from_dict(data: Mapping, *, source: str = "<dict>", path: str | None = None, plugin_schemas=None) -> Config:
    """Validate plain data (the shape of cfn.toml) without reading files or the environment."""
    all_schemas = schemas(plugin_schemas)
    plugins = _plugins_from(data.get("plugins", []), source)
    sections = {}
    for key in data:
        if key not in ("plugins", "agents", "tasks") and key not in all_schemas:
            raise ConfigError(f"{source}: unknown table {key!r}{did_you_mean(key, [*all_schemas, 'agents'])}")
    for name, cls in all_schemas.items():
        raw = data.get(name, {})
        sections[name] = _build_section(name, cls, {k: (v, source, False) for k, v in raw.items()})
    roles = _build_roles(_role_tables(data.get("agents", {}), source))
    _apply_roles(sections, roles, {k: (v, source, False) for k, v in data.get("workload", {}).items()})
    _check_failure_policy(sections["workload"], {k: (v, source, False) for k, v in data.get("workload", {}).items()})
    tasks = workflow_tasks(data.get("tasks", []), source, roles)
    return Config(plugins=tuple(plugins), sections=sections, path=path, roles=roles, tasks=tasks)


# ---------------------------------------------------------------------- workflows ([[tasks]])


@define(frozen=True)
class WorkflowTask:
    """One ``[[tasks]]`` entry: a task of a workflow that ``cfn run`` executes (cfn_core.feed)."""

    id: str
    payload: Any = None
    role: str | None = None
    needs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"id": self.id, "payload": self.payload, "role": self.role, "needs": list(self.needs)}


_TASK_KEYS = ("id", "payload", "role", "needs")


def workflow_tasks(value: Any, source: str, roles: Mapping[str, Any]) -> tuple[WorkflowTask, ...]:
    """The ``[[tasks]]`` array of tables, checked: unique ids, known roles, needs that exist, no cycle."""
    if value in ([], (), None):
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: tasks = {str(value)[:80]}: write each task as a [[tasks]] table with id, payload, role, needs")
    known_roles = list(roles) or ["worker"]
    out: list[WorkflowTask] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(value, 1):
        where = f"{source}: [[tasks]] #{n}"
        for key in raw:
            if key not in _TASK_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, _TASK_KEYS)}; valid: {', '.join(_TASK_KEYS)}")
        task_id = raw.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise ConfigError(f"{where}: id = {task_id!r}: every task needs an id, a non-empty string")
        where = f"{source}: [[tasks]] id = {task_id!r}"
        if task_id in seen:
            raise ConfigError(f"{where}: the id is used twice (tasks #{seen[task_id]} and #{n}); task ids must be unique")
        seen[task_id] = n
        role = raw.get("role")
        if role is not None and role not in known_roles:
            raise ConfigError(f"{where}: role = {role!r}: unknown role{did_you_mean(str(role), known_roles)}; roles: {', '.join(known_roles)}")
        needs = raw.get("needs", [])
        if isinstance(needs, str) or not isinstance(needs, (list, tuple)) or not all(isinstance(x, str) for x in needs):
            raise ConfigError(f"{where}: needs = {needs!r}: a list of task ids, e.g. needs = [\"split\"]")
        out.append(WorkflowTask(id=task_id, payload=raw.get("payload"), role=role, needs=tuple(dict.fromkeys(needs))))
    ids = [t.id for t in out]
    for t in out:
        for need in t.needs:
            if need not in seen:
                raise ConfigError(
                    f"{source}: [[tasks]] id = {t.id!r}: needs = {list(t.needs)!r} names {need!r}, which is no task's id"
                    f"{did_you_mean(need, ids)}; tasks: {', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}"
                )
    cycle = _find_cycle({t.id: t.needs for t in out})
    if cycle:
        raise ConfigError(f"{source}: [[tasks]] needs form a cycle: {' -> '.join(cycle)}; a workflow must be acyclic")
    return tuple(out)


def _find_cycle(needs: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle of ``needs`` (``[a, b, a]``), or None.  Iterative: a long chain must not hit the recursion limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in needs:
        if state.get(start):
            continue
        path, stack = [start], [iter(needs[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(needs[nxt]))
    return None


def _plugins_from(value: Any, source: str) -> list[str]:
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{source}: plugins = {value!r}: must be a list of plugin names, e.g. [\"pool\", \"batch\"]")
    return [p for p in value if p not in ("baseline", "none")]


# ---------------------------------------------------------------------- checks across tables


def check_coordination(config: Config) -> None:
    """Refuse a configuration whose settings are each allowed but do not work together.

    Called when a :class:`~cfn_core.Coordinator` is made, before anything starts (so
    that ``cfn run`` exits 2 before it spawns a single agent): agents over ``max_agents``,
    a mesh that cannot be planned, a payload that cannot fit in a message, a mesh whose
    peer messages cannot fit in the inboxes, and the paths the run will write or read.
    """
    w = config.workload
    if w.agents > config.run.max_agents:
        raise ConfigError(
            f"[workload] agents = {w.agents} exceeds [run] max_agents = {config.run.max_agents}; "
            "raise max_agents if you mean it"
        )
    if w.topology == "mesh" and w.tasks and w.tasks > w.agents:
        raise ConfigError(
            f"[workload] tasks = {w.tasks} with topology = 'mesh': a mesh needs every task on its own agent "
            f"(tasks <= agents = {w.agents})"
        )
    if w.topology == "mesh" and w.messages_per_agent and w.agents < 2:
        raise ConfigError("[workload] topology = 'mesh' with messages_per_agent > 0 needs agents >= 2")
    if w.payload_bytes + 512 > config.bus.max_message_bytes:
        raise ConfigError(
            f"[workload] payload_bytes = {w.payload_bytes} does not fit in a message: "
            f"[bus] max_message_bytes = {config.bus.max_message_bytes} (allow ~512 bytes of envelope)"
        )
    _check_mesh_fan_in(config)
    # found now, not after the run when the file is written (or a task runs)
    metrics_file = config.run.metrics_file
    if metrics_file:
        parent = os.path.dirname(os.path.abspath(metrics_file))
        if os.path.isdir(metrics_file):
            raise ConfigError(f"[run] metrics_file = {metrics_file!r} is a directory; name a file in it, e.g. {os.path.join(metrics_file, 'cfn.prom')!r}")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ConfigError(
                f"[run] metrics_file = {metrics_file!r}: directory {parent} does not exist or is not writable"
            )
    if w.directory and not os.path.isdir(w.directory):
        raise ConfigError(
            f"[workload] directory = {w.directory!r}: no such directory (handler modules are imported "
            "from it and commands run in it)"
        )


def _check_mesh_fan_in(config: Config) -> None:
    """A mesh whose peer messages cannot fit in the inboxes.

    The same figure is checked again per round (the tasks given to ``run`` may differ
    from the configured ones); here it is the configured workload.
    """
    from .round import mesh_depth_message, mesh_peer_indices

    w = config.workload
    depth = config.bus.inbox_depth
    n = w.tasks or w.agents
    if w.topology != "mesh" or not w.messages_per_agent or not depth or n < 2:
        return
    if n * w.messages_per_agent * w.rounds > 5_000_000:
        return  # too costly to plan ahead; each round still checks its own plan
    for number in range(1, w.rounds + 1):
        expect = [0] * n
        for row in mesh_peer_indices(n, w.messages_per_agent, w.seed, number):
            for j in row:
                expect[j] += 1
        if max(expect) + 1 > depth:
            raise ConfigError(mesh_depth_message(number, max(expect), w.messages_per_agent, depth))


# ---------------------------------------------------------------------- cfn init


def render_default_toml(plugin_schemas: Mapping[str, type] | None = None, plugins: tuple[str, ...] = ()) -> str:
    """A commented cfn.toml with every key at its default (round-trips through :func:`load_config`)."""
    import tomli_w

    lines = [
        "# cfn configuration.  Precedence: command line > CFN_* environment > this file > defaults.",
        "# Every key of [table] can also be set as CFN_<TABLE>_<KEY> or `cfn run --set table.key=value`.",
        "",
        "# Optimization plugins to enable (installed ones: `cfn plugins`).  Empty: the baseline.",
        "# Turning an optimization off is removing its name, or writing \"no:name\".",
        tomli_w.dumps({"plugins": list(plugins)}).strip(),
    ]
    for table, cls in schemas(plugin_schemas).items():
        lines += ["", f"[{table}]"]
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            lines.append(f"# {doc[0]}")
        for fld in attrs.fields(cls):
            names = ", ".join(env_names(table, fld))
            lines.append(f"# {fld.metadata['help']}. Allowed: {describe_allowed(fld)}. Env: {names}")
            default = _default(fld)
            value = list(default) if isinstance(default, tuple) else default
            lines.append(tomli_w.dumps({fld.name: value}).strip())
    return "\n".join(lines) + "\n"
