"""Graceful degradation: when an optimization plugin's step fails at run time,
log it once, count it, and run the baseline for that call (the plan's fallback
mechanism).  ``[run] strict = true`` makes the failure fatal instead.

Only steps whose baseline is interchangeable with any plugin's are covered:
spawning, assignment, release, send and read (both of which still use
``cfn_route``, so a sharded layout stays consistent).  ``cfn_bus`` and
``cfn_route`` never fall back: every process must agree on them.
User errors (:class:`~cfn_core.errors.CfnError`) are never swallowed.
"""

from __future__ import annotations

import logging

from . import builtin
from .errors import CfnError, PluginError
from .plugins import KERNEL_PLUGIN_NAMES
from .hookspecs import hookimpl

log = logging.getLogger("cfn")


def record_fallback(ctx, hook: str, plugin: str | None, exc: BaseException) -> None:
    key = f"{hook}:{plugin or '?'}"
    entry = ctx.fallbacks.get(key)
    if entry is None:
        entry = ctx.fallbacks[key] = {
            "hook": hook,
            "plugin": plugin,
            "count": 0,
            "error": f"{type(exc).__name__}: {exc}",
            "side": getattr(ctx, "side", "coordinator"),
        }
        log.warning("plugin %s failed in %s (%s); using the baseline for it", plugin or "?", hook, entry["error"])
        _emit_fallback(ctx, entry)
    entry["count"] += 1
    metrics = getattr(ctx, "metrics", None)
    if metrics is not None:
        metrics.fallbacks.labels(hook=hook, plugin=plugin or "?").inc()


def _emit_fallback(ctx, entry: dict) -> None:
    """The first fallback of a hook and plugin, in the event log (agents' contexts have none)."""
    events = getattr(ctx, "events", None)
    if events is not None:
        events.emit("fallback", hook=entry["hook"], plugin=entry["plugin"], side=entry["side"], error=entry["error"])


def _culprit(ctx, exc: BaseException) -> str | None:
    """The enabled plugin whose code raised: the innermost traceback frame in its package."""
    owners = {}
    for name, plugin in ctx.pm.list_name_plugin():
        if name in KERNEL_PLUGIN_NAMES:  # the kernel's own: every cfn_core frame is theirs
            continue
        module = getattr(plugin, "__name__", None) or type(plugin).__module__
        owners[module.split(".")[0]] = name
    found = None
    tb = exc.__traceback__
    while tb is not None:
        top = tb.tb_frame.f_globals.get("__name__", "").split(".")[0]
        found = owners.get(top, found)
        tb = tb.tb_next
    return found


def _degrade(hook: str, ctx, kwargs: dict, exc: Exception):
    if isinstance(exc, CfnError):
        raise exc
    plugin = _culprit(ctx, exc)
    if plugin is None:
        raise exc  # the baseline itself failed: nothing to fall back to
    if ctx.config.run.strict:  # one line naming the plugin for the user; the traceback stays chained
        raise PluginError(
            f"plugin {plugin!r} failed in {hook} ({type(exc).__name__}: {exc}); "
            "[run] strict = true stops the run instead of falling back to the baseline"
        ) from exc
    ctx.note_fallback(hook, plugin, exc)
    impl = getattr(builtin, hook, None)
    return impl(**kwargs) if impl is not None else None


@hookimpl(wrapper=True, tryfirst=True)
def cfn_launch_agent(ctx, agent_id):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_launch_agent", ctx, {"ctx": ctx, "agent_id": agent_id}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_spawn(ctx, agent_ids):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_spawn", ctx, {"ctx": ctx, "agent_ids": agent_ids}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_acquire_agents(ctx, count):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_acquire_agents", ctx, {"ctx": ctx, "count": count}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_assign(ctx, task, agent_ids):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_assign", ctx, {"ctx": ctx, "task": task, "agent_ids": agent_ids}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_release_agents(ctx, agent_ids):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_release_agents", ctx, {"ctx": ctx, "agent_ids": agent_ids}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_send(ctx, messages, flush):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_send", ctx, {"ctx": ctx, "messages": messages, "flush": flush}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_read(ctx, agent_id):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_read", ctx, {"ctx": ctx, "agent_id": agent_id}, exc)


@hookimpl(wrapper=True, tryfirst=True)
def cfn_flush(ctx, reason):
    try:
        return (yield)
    except Exception as exc:
        return _degrade("cfn_flush", ctx, {"ctx": ctx, "reason": reason}, exc)


def merge_agent_fallbacks(ctx, agent_key, reported) -> None:
    """Fold the fallbacks an agent reported in a result into the coordinator's (``side: agent``).

    ``reported`` is the agent's own list (counts since that agent process started);
    ``agent_key`` identifies the process, so each count is added once.
    """
    if not isinstance(reported, list):
        return
    seen = ctx.state.setdefault("fallback.agent_counts", {})
    for fb in reported:
        if not isinstance(fb, dict):
            continue
        hook, plugin, count = fb.get("hook"), fb.get("plugin"), fb.get("count")
        if not isinstance(hook, str) or not isinstance(count, int) or isinstance(count, bool):
            continue
        plugin = plugin if isinstance(plugin, str) else "?"
        key = f"{hook}:{plugin}:agent"
        delta = count - seen.get((agent_key, key), 0)
        if delta <= 0:
            continue
        seen[(agent_key, key)] = count
        entry = ctx.fallbacks.get(key)
        if entry is None:
            error = fb.get("error") if isinstance(fb.get("error"), str) else "?"
            entry = ctx.fallbacks[key] = {"hook": hook, "plugin": plugin, "count": 0, "error": error, "side": "agent"}
            log.warning("plugin %s failed in %s in agents (%s); they used the baseline for it", plugin, hook, error)
            _emit_fallback(ctx, entry)
        entry["count"] += delta
        ctx.metrics.fallbacks.labels(hook=hook, plugin=plugin).inc(delta)
