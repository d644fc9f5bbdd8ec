"""Agents' plugin counters, gathered on the coordinator.

An agent-side plugin counts what it does in ``ctx.counters`` (plain integers;
an agent has no metrics registry).  The kernel carries them to the
coordinator two ways, and :class:`AgentFigures` keeps the best of both for
every agent process:

* every result carries the agent's non-zero counters as they were when the
  result was handed to ``cfn_send`` (so what a plugin counts while sending
  that very result, and anything after the last result, is not in it);
* an agent that exits normally leaves its final counters in the run's shared
  state (``figures.<agent>.<pid>``, written by the kernel's ``cfn_agent_exit``
  after every plugin's own ``cfn_agent_exit``, so a batching plugin's final
  flush is counted), which replace that process's last result snapshot.

Plugins read them on the coordinator with
:meth:`cfn_core.CoordinatorContext.agent_counters` (usually in ``cfn_report``),
one snapshot per agent process, and add them up as they see fit.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import orjson

from .errors import CfnError

#: marks a process's final counters (from its exit state), which no result replaces
_FINAL = float("inf")


def exit_state_key(agent_id: str, pid: int) -> str:
    """The shared-state key an agent process leaves its final counters under."""
    return f"figures.{agent_id}.{pid}"


def final_counters(counters: Mapping[str, Any]) -> dict[str, int]:
    """The non-zero integers of ``counters`` (what a result carries, and an exiting agent leaves).

    ``dict(counters)`` copies in one step (no Python code runs between its items), so a
    plugin's thread may add a counter while this runs: a plugin creates its counters when
    it first counts them, never up front.
    """
    return {k: v for k, v in dict(counters).items() if v and type(v) is int}


def publish_exit_counters(bus, agent_id: str, pid: int, counters: Mapping[str, Any]) -> None:
    """Leave an exiting agent's non-zero integer counters in the run's shared state (never raises)."""
    snapshot = final_counters(counters)
    if not snapshot:
        return
    try:
        bus.put_state(exit_state_key(agent_id, pid), orjson.dumps(snapshot))
    except (CfnError, OSError):  # an id too long for a state key, a full bus: the result snapshots stand
        pass


def _integers(counters: Mapping) -> dict[str, int]:
    # a result's body is the agent's (or a forger's): only integer counters are figures
    return {k: v for k, v in counters.items() if isinstance(k, str) and type(v) is int}


class AgentFigures:
    """The latest counters of every agent process (agent id, ``"<agent>.<pid>"``)."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], tuple[float, dict]] = {}

    def take_result(self, src: str, process: str, seq: int, counters: Any) -> None:
        """A result of agent ``src``'s incarnation ``process`` carried ``counters`` (its ``seq``-th message)."""
        if not isinstance(counters, dict):
            return
        seen = self._latest.get((src, process))
        if seen is None or seq > seen[0]:
            self._latest[(src, process)] = (seq, counters)

    def take_final(self, agent_id: str, pid: int, counters: Any) -> None:
        """An exited agent's final counters, reported rather than left in the shared state (a hosted agent's)."""
        if isinstance(counters, dict):
            self._latest[(agent_id, f"{agent_id}.{pid}")] = (_FINAL, _integers(counters))

    def take_exit_states(self, bus, handles: Iterable) -> None:
        """Prefer the final counters of agents that have exited (:func:`publish_exit_counters`)."""
        for h in list(handles):
            if h.alive or h.pid is None:
                continue
            key = (h.id, f"{h.id}.{h.pid}")
            seen = self._latest.get(key)
            if seen is not None and seen[0] == _FINAL:
                continue
            try:
                raw = bus.get_state(exit_state_key(h.id, h.pid))
            except (CfnError, OSError):
                continue
            if not raw:
                continue
            try:
                snapshot = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(snapshot, dict):
                self._latest[key] = (_FINAL, snapshot)

    def snapshots(self, prefix: str = "") -> dict[tuple[str, str], dict[str, int]]:
        """``{(agent id, process): {counter: value}}`` for the counters whose name starts with ``prefix``."""
        out = {}
        for key, (_seq, counters) in list(self._latest.items()):  # a metrics scrape runs in another thread
            picked = {k: v for k, v in _integers(counters).items() if k.startswith(prefix)}
            if picked:
                out[key] = picked
        return out
