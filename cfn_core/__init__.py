"""cfn: coordinate hundreds to thousands of agent processes over a lossless message bus.

Public API (plugins import only these names and :mod:`cfn_core.hookspecs`)::

    from cfn_core import Coordinator, load_config, hookimpl
"""

import importlib

# Names are imported on first use (PEP 562) so that an agent process, which
# needs only the bus and the hooks, does not pay for the coordinator's imports.
_EXPORTS = {
    "Config": "config",
    "config_from_dict": "config",
    "load_config": "config",
    "setting": "config",
    "AgentHandle": "coordinator",
    "Coordinator": "coordinator",
    "CoordinatorContext": "coordinator",
    "SpawnReport": "coordinator",
    "BusError": "errors",
    "CfnError": "errors",
    "ConfigError": "errors",
    "InboxFull": "errors",
    "MessageTooLarge": "errors",
    "PluginError": "errors",
    "ResourceLimitError": "errors",
    "ensure_fds_for_agents": "process",
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "COORDINATOR_ID": "messages",
    "Message": "messages",
    "Task": "messages",
    "TaskResult": "messages",
    "check_agent_id": "messages",
    "decode": "messages",
    "CoordinationResult": "report",
    "RoundResult": "report",
    "start_process": "process",
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


__all__ = [
    "AgentHandle",
    "BusError",
    "COORDINATOR_ID",
    "CfnError",
    "Config",
    "ConfigError",
    "CoordinationResult",
    "Coordinator",
    "CoordinatorContext",
    "InboxFull",
    "Message",
    "MessageTooLarge",
    "PluginError",
    "ResourceLimitError",
    "RoundResult",
    "SpawnReport",
    "Task",
    "TaskResult",
    "check_agent_id",
    "config_from_dict",
    "decode",
    "ensure_fds_for_agents",
    "hookimpl",
    "hookspec",
    "load_config",
    "setting",
    "start_process",
]
