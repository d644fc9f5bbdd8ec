"""The plugin manager: builtins, entry points (group ``cfn``), selection from cfn.toml.

* The kernel's baseline (:mod:`cfn_core.builtin`) is always registered, marked
  ``trylast``; :mod:`cfn_core.fallback` wraps the replaceable steps.
* Plugins are *installed* when a distribution publishes an entry point in the
  group ``cfn``; they are *enabled* by name in ``plugins = [...]``; ``no:name``
  blocks one.  An unknown name fails at once, listing the installed ones.
* ``check_pending()`` runs right after loading: a misspelt hook name in a
  plugin is an error at start, not a silently ignored function.
* The installation hooks (``cfn_settings``, ``cfn_feature_flags``,
  ``cfn_add_commands``) are called on every installed plugin, enabled or not,
  without registering it (:func:`installed_plugins`).
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError, did_you_mean

log = logging.getLogger("cfn")

ENTRY_POINT_GROUP = "cfn"

#: builtin plugins, registered in this order in every process
BUILTIN_PLUGINS = ("cfn_core.builtin", "cfn_core.fallback", "cfn_core.hosting")
#: the names the builtins are registered under (never a plugin a user enabled)
KERNEL_PLUGIN_NAMES = frozenset(modname.rsplit(".", 1)[1] for modname in BUILTIN_PLUGINS)
#: the baseline and its fallback wrapper: with nothing else on a hook, direct_caller calls the baseline
_DIRECT = ("builtin", "fallback")

#: the kernel's own command modules: they add their subcommands through
#: ``cfn_add_commands`` like any installed plugin, and are never part of a run
BUILTIN_COMMANDS = ("cfn_core.bench.cli",)


class CfnPluginManager(pluggy.PluginManager):
    """A pluggy PluginManager that knows cfn's hookspecs."""

    def __init__(self) -> None:
        super().__init__("cfn")
        self.add_hookspecs(hookspecs)

    def parse_hookimpl_opts(self, plugin, name):
        # only cfn_* names are hook implementations (as pytest does for pytest_*)
        if not name.startswith("cfn_"):
            return None
        return super().parse_hookimpl_opts(plugin, name)


@functools.lru_cache(maxsize=1)
def installed() -> dict:
    """Every entry point in group ``cfn``, by name (cached per process)."""
    import importlib.metadata as md  # scanning distributions is slow: only when asked

    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


#: plugins whose module path is already known (agents get them from the coordinator
#: and skip the slow entry-point scan): name -> "module" or "module:attr"
_KNOWN: dict[str, str] = {}


def use_plugin_modules(modules: dict[str, str]) -> None:
    """Tell this process where enabled plugins live, without scanning entry points."""
    _KNOWN.update(modules)


def plugin_modules(names) -> dict[str, str]:
    """``{name: "module[:attr]"}`` of installed plugins, for handing to agents."""
    eps = installed()
    return {n: eps[n].value for n in names if n in eps}


@functools.lru_cache(maxsize=None)
def load_plugin(name: str) -> Any:
    """Import the object behind entry point ``name``."""
    if name in _KNOWN:
        modname, _, attr = _KNOWN[name].partition(":")
        module = importlib.import_module(modname)
        return getattr(module, attr) if attr else module
    eps = installed()
    if name not in eps:
        raise unknown_plugin(name)
    try:
        return eps[name].load()
    except Exception as exc:  # an installed plugin that cannot be imported
        raise PluginError(f"plugin {name!r} ({eps[name].value}) cannot be imported: {exc}") from exc


def unknown_plugin(name: str) -> PluginError:
    names = sorted(installed())
    listing = ", ".join(names) if names else "none (pip install -r requirements.txt installs the bundled ones)"
    return PluginError(f"unknown plugin {name!r}{did_you_mean(name, names)}; installed plugins: {listing}")


def installed_plugins() -> Iterator[tuple[str, Any]]:
    """``(name, plugin)`` for every installed plugin that can be imported, enabled or not.

    For the installation hooks (``cfn_settings``, ``cfn_feature_flags``,
    ``cfn_add_commands``), which describe what is installed rather than take
    part in a run: they are called on the plugin object directly, no plugin
    manager involved.  A plugin that cannot be imported is skipped here (a
    broken plugin must not block the rest) and reported when it is enabled.
    """
    for name in installed():
        try:
            yield name, load_plugin(name)
        except PluginError:
            continue


def installed_settings() -> dict[str, type]:
    """The cfn.toml tables declared by every installed plugin (``cfn_settings``)."""
    tables: dict[str, type] = {}
    for _name, plugin in installed_plugins():
        impl = getattr(plugin, "cfn_settings", None)
        if impl is not None:
            tables.update(impl() or {})
    return tables


def installed_feature_flags() -> dict[str, str]:
    """``{environment variable: plugin name}`` declared by every installed plugin (``cfn_feature_flags``).

    :raises PluginError: when two installed plugins declare the same variable
        (which one it would switch depends on nothing the user can see).
    """
    flags: dict[str, str] = {}
    for name, plugin in installed_plugins():
        impl = getattr(plugin, "cfn_feature_flags", None)
        for var in (impl() or ()) if impl is not None else ():
            if flags.get(var, name) != name:
                raise PluginError(
                    f"plugins {flags[var]!r} and {name!r} both declare the feature flag {var} (cfn_feature_flags); "
                    "uninstall one of them"
                )
            flags[var] = name
    return flags


def add_plugin_commands(subparsers) -> None:
    """Let the kernel's command modules and every installed plugin add ``cfn`` subcommands (``cfn_add_commands``).

    Installed plugins are asked whether they are enabled or not, in entry-point
    order.  One whose hook fails (a name taken already, a bug) gets a warning and
    no commands; the others' and the kernel's commands are there all the same.
    """
    for modname in BUILTIN_COMMANDS:
        importlib.import_module(modname).cfn_add_commands(subparsers=subparsers)
    for name, plugin in installed_plugins():
        impl = getattr(plugin, "cfn_add_commands", None)
        if impl is None:
            continue
        try:
            impl(subparsers=subparsers)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("cfn: warning: plugin %r could not add its commands (%s: %s); they are left out", name, type(exc).__name__, exc)


def plugin_implementations(pm: pluggy.PluginManager, hookname: str, exclude: Any = None) -> list[str]:
    """Names of the plugins other than the kernel's (and other than ``exclude``, a plugin
    object) that implement hook ``hookname``, in pluggy's call order.

    For a plugin that must know whether another one takes part in a hook (cfn-pool forks
    ahead only when no other plugin may launch agents elsewhere) without knowing the
    kernel's own plugin names.
    """
    names = []
    for impl in reversed(getattr(pm.hook, hookname).get_hookimpls()):
        name = pm.get_name(impl.plugin)
        if impl.plugin is not exclude and name not in KERNEL_PLUGIN_NAMES:
            names.append(name)
    return names


def builtin_plugin_manager() -> CfnPluginManager:
    """A manager with the builtins alone (the baseline and the fallback wrappers)."""
    pm = CfnPluginManager()
    for modname in BUILTIN_PLUGINS:
        module = __import__(modname, fromlist=["_"])
        pm.register(module, name=modname.rsplit(".", 1)[1])
    return pm


def make_plugin_manager(config, extra_plugins=()) -> CfnPluginManager:
    """A manager with the builtins and the plugins ``config`` enables, checked and configured.

    :param extra_plugins: plugin objects registered besides the enabled entry points
        (tests, embedding applications).  They live in this process only: agents
        do not load them, so they should implement coordinator-side hooks.
    """
    pm = builtin_plugin_manager()
    for name in config.blocked():
        if name not in _KNOWN and name not in installed():
            raise unknown_plugin(name)
    for name in config.enabled():
        plugin = load_plugin(name)
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=name)
    for i, plugin in enumerate(extra_plugins):
        if not pm.is_registered(plugin):
            pm.register(plugin, name=getattr(plugin, "name", None) or f"extra-{i}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook cfn does not have: {exc}") from None
    pm.hook.cfn_configure(config=config)
    return pm


def _no_result(**kwargs) -> None:
    return None


def direct_caller(pm: pluggy.PluginManager, name: str):
    """A callable (keyword arguments, like ``pm.hook.<name>``) for a per-message hook.

    When no plugin implements ``name``, only the baseline does (or nothing),
    and the fallback wrapper has nothing to fall back from: the baseline's
    function is returned itself (or a no-op), which skips pluggy's dispatch.
    When exactly one plugin implements it (a plain implementation, the common
    case: cfn-batch's ``cfn_send`` and ``cfn_flush``, cfn-shard's ``cfn_read``),
    a small function calls it and the baseline in pluggy's order and hands an
    exception to the fallback wrapper's own handler, as pluggy would, without
    pluggy's dispatch (its argument checks and the wrapper's generator: ~2 µs
    of a warm call, several times that on the cold caches of an agent among
    hundreds; measured in docs/plugins/batch.md).  Anything else (two plugins,
    a plugin's own wrapper, hook call monitoring) gets the hook caller itself.
    Only for ``firstresult`` hooks and hooks whose result is not used (the
    baseline's value is then the same as pluggy's); call it after every plugin
    is registered.
    """
    # a host asks for each of its agents; a plugin registered later (cfn-batch's wrapper) starts afresh
    cache = pm.__dict__.setdefault("_cfn_direct_callers", {})
    key = (name, len(pm.get_plugins()), getattr(pm, "_inner_hookexec", None))  # (monitoring replaces the last)
    found = cache.get(key)
    if found is not None:
        return found
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    if all(pm.get_name(impl.plugin) in _DIRECT for impl in impls):
        base = [impl.function for impl in impls if pm.get_name(impl.plugin) == "builtin"]
        found = base[0] if base else _no_result
    else:
        found = _one_plugin_caller(pm, name, caller, impls) or caller
    cache[key] = found
    return found


def _one_plugin_caller(pm, name: str, caller, impls):
    """The direct call of one plugin's implementation and the baseline's, or None when pluggy is needed."""
    from . import fallback

    import pluggy._manager

    if getattr(pm, "_inner_hookexec", None) is not getattr(pluggy._manager, "_multicall", object()):
        return None  # hook call monitoring (pm.enable_tracing) or a pluggy that works otherwise: keep pluggy
    wrappers = [impl for impl in impls if impl.wrapper or impl.hookwrapper]
    plain = [impl for impl in reversed(impls) if not (impl.wrapper or impl.hookwrapper)]  # pluggy's call order
    others = [impl for impl in plain if pm.get_name(impl.plugin) not in _DIRECT]
    if len(others) != 1 or any(pm.get_name(w.plugin) != "fallback" for w in wrappers) or any(i.kwargnames for i in plain):
        return None
    argnames = tuple(caller.spec.argnames)  # every cfn hook has a spec (CfnPluginManager adds them first)
    if "ctx" not in argnames:
        return None
    firstresult = bool(caller.spec.opts.get("firstresult"))
    steps = []
    for impl in plain:
        if tuple(impl.argnames) == argnames:
            steps.append(impl.function)
        else:  # an implementation may take fewer arguments than the hook has (pluggy passes only those)
            steps.append(_taking(impl.function, tuple(impl.argnames)))
    degrade = (lambda kw, exc: fallback._degrade(name, kw["ctx"], kw, exc)) if wrappers else None

    def call(**kw):
        try:
            result = None
            for step in steps:
                value = step(**kw)
                if value is not None:
                    if firstresult:
                        return value
                    result = value
            return result
        except Exception as exc:
            if degrade is None:
                raise
            return degrade(kw, exc)

    call.__qualname__ = f"direct {name}"
    return call


def _taking(function, names: tuple):
    return lambda **kw: function(**{n: kw[n] for n in names})


def hook_call_order(pm: CfnPluginManager) -> dict[str, list[str]]:
    """For every hook, the plugin names in the order pluggy calls them."""
    order = {}
    for hookname in sorted(n for n in dir(pm.hook) if n.startswith("cfn_")):
        caller = getattr(pm.hook, hookname)
        names = [pm.get_name(impl.plugin) for impl in reversed(caller.get_hookimpls())]
        if names:
            order[hookname] = names
    return order


def describe_plugins(config) -> list[dict]:
    """What ``cfn plugins`` prints: every installed plugin and the builtins."""
    enabled, blocked = set(config.enabled()), set(config.blocked())
    for name in sorted(enabled | blocked):
        if name not in installed():
            raise unknown_plugin(name)  # the same answer `cfn run` would give
    pm = builtin_plugin_manager()
    rows = []
    for name, ep in sorted(installed().items()):
        dist = ep.dist
        row = {
            "name": name,
            "module": ep.value,
            "distribution": dist.metadata["Name"] if dist else None,
            "version": dist.version if dist else None,
            "status": "blocked" if name in blocked else "enabled" if name in enabled else "installed",
            "hooks": [],
        }
        try:
            plugin = load_plugin(name)
            row["hooks"] = sorted(n for n in dir(plugin) if n.startswith("cfn_") and callable(getattr(plugin, n)))
        except PluginError as exc:
            row["status"] = "broken"
            row["error"] = str(exc)
        rows.append(row)
    # register in the configuration's order, as make_plugin_manager does: the call order
    # shown must be the one a run uses (the last listed plugin is asked first)
    broken = {row["name"] for row in rows if row["status"] == "broken"}
    for name in config.enabled():
        if name not in broken:
            plugin = load_plugin(name)
            if not pm.is_registered(plugin):
                pm.register(plugin, name=name)
    order = hook_call_order(pm)
    for position, modname in enumerate(BUILTIN_PLUGINS):
        short = modname.rsplit(".", 1)[1]
        module = __import__(modname, fromlist=["_"])
        rows.insert(
            position,  # the kernel's first, in BUILTIN_PLUGINS order
            {
                "name": short,
                "module": modname,
                "distribution": "cfn-core",
                "version": _version("cfn-core"),
                "status": "builtin",
                "hooks": sorted(n for n in dir(module) if n.startswith("cfn_") and callable(getattr(module, n))),
            },
        )
    for row in rows:
        row["call_order"] = {h: names for h, names in order.items() if row["name"] in names}
    return rows


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
