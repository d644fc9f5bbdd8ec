"""The fork-server interface: what ``cfn_agent_forker`` returns.

A host that starts agents for a coordinator on another machine (``cfn agent``
of a distributed transport) starts each agent as a fresh interpreter, unless a
plugin offers a fork server: a warm process with the interpreter, the kernel,
the plugins and the handler already imported, which forks agents in
milliseconds.  The host only needs the methods below, so any plugin can offer
one (the bundled pooling plugin offers the zygote it uses on the coordinator).
"""

from __future__ import annotations

from typing import Iterable, Protocol


class AgentForker(Protocol):
    """Forks agent processes of one run, on request, from a warm process.

    A forked agent reads its inbox as the agent id it was forked for, dies with
    the fork server (and the fork server with its host), and is the fork
    server's child: its exit status is asked for with :meth:`exit_status`.
    """

    @property
    def outstanding(self) -> int:
        """Fork requests sent and not taken yet."""

    def request(self, agent_ids: Iterable[str]) -> None:
        """Ask for agents to be forked, without waiting (``take`` collects each pid).

        Requests are pipelined: the server forks while the host does other work.
        """

    def take(self, agent_id: str, timeout: float = 10.0) -> int:
        """The pid forked for ``agent_id``, requesting it now unless it was requested ahead.

        :raises Exception: when the agent cannot be forked in ``timeout``; the
            host then starts that agent (and the next ones) as fresh interpreters.
        """

    def cancel_unclaimed(self, timeout: float = 5.0) -> int:
        """Kill agents forked ahead that nobody took; return how many."""

    def exit_status(self, pid: int, timeout: float = 1.0) -> int | None:
        """Exit status of a forked agent that has ended (negative: killed by that signal), None if unknown."""

    def close(self, timeout: float) -> None:
        """Stop the fork server (and any agent of it still running); kill it after ``timeout``."""
