"""cfn: coordinate hundreds to thousands of agent processes over a lossless message bus.

The public API is the names below (``cfn_core.__all__``) and
:mod:`cfn_core.hookspecs`; docs/PLUGIN_GUIDE.md ("The public API") lists them
with what each is for.  Plugins import nothing else from the kernel
(tests/test_layering.py checks it)::

    from cfn_core import Coordinator, load_config, hookimpl
"""

import importlib

# Names are imported on first use (PEP 562) so that an agent process, which
# needs only the bus and the hooks, does not pay for the coordinator's imports.
# name -> the kernel module that defines it, grouped as the plugin guide lists them.
_EXPORTS = {
    # writing a plugin
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "setting": "config",
    # configuration
    "Config": "config",
    "config_from_dict": "config",
    "load_config": "config",
    # errors
    "BusError": "errors",
    "Cancelled": "errors",
    "CfnError": "errors",
    "ConfigError": "errors",
    "InboxFull": "errors",
    "MessageTooLarge": "errors",
    "NotJSON": "errors",
    "PeerGone": "errors",
    "ReceiveTimeout": "errors",
    "RequestTimeout": "errors",
    "UnknownAgent": "errors",
    "PluginError": "errors",
    "ResourceLimitError": "errors",
    "TaskFailed": "errors",
    # the coordinator and its results
    "AgentHandle": "context",
    "Coordinator": "coordinator",
    "CoordinatorContext": "context",
    "SpawnReport": "context",
    "CoordinationResult": "report",
    "RoundResult": "report",
    # messages
    "COORDINATOR_ID": "messages",
    "Message": "messages",
    "MessageFactory": "messages",
    "Task": "messages",
    "TaskResult": "messages",
    "check_agent_id": "messages",
    "check_inbox_id": "messages",
    "decode": "messages",
    # roles ([agents.<role>])
    "Role": "roles",
    "role_of": "roles",
    "roles_of": "roles",
    "share_out": "roles",
    # the transport
    "Bus": "bus",
    "ShmBus": "bus.shm",
    "decode_records": "builtin",
    # plugin managers
    "builtin_plugin_manager": "plugins",
    "make_plugin_manager": "plugins",
    "plugin_implementations": "plugins",
    # running agents
    "Agent": "agent_api",
    "RateLimited": "agent_api",
    # LLM usage (docs/LLM_SWARMS.md)
    "Usage": "usage",
    "check_usage": "usage",
    "AgentContext": "agent",
    "AgentMessage": "agent_api",
    "AgentForker": "forker",
    "bootstrap_shm": "agent",
    "config_from_state": "agent",
    "load_handler": "agent",
    "run_agent": "agent",
    # processes and resource limits
    "become_subreaper": "process",
    "die_with_parent": "process",
    "ensure_fd_limit": "process",
    "ensure_fds_for_agents": "process",
    "kill_leftovers": "process",
    "open_fd_count": "process",
    "start_process": "process",
    "wait_readable": "process",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cfn_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
