"""Errors a user can cause.  The CLI prints them in one line and exits 2."""

from __future__ import annotations


class CfnError(Exception):
    """Base class of every error cfn raises on purpose.

    The message is written for the user: it names the file, key, value and
    what is allowed.  ``exit_code`` is what the CLI returns for it.
    """

    exit_code = 2


class ConfigError(CfnError):
    """cfn.toml, a CFN_* variable or a command-line override is wrong."""


class PluginError(CfnError):
    """A plugin name is unknown, blocked, or a plugin broke its contract."""


class BusError(CfnError):
    """The message bus cannot be used (missing, full, not ours, unsafe)."""


class MessageTooLarge(BusError):
    """One encoded message is bigger than ``bus.max_message_bytes``."""


class InboxFull(BusError):
    """An inbox holds ``bus.inbox_depth`` unread messages and the sender gave up waiting."""


class UnknownAgent(CfnError):
    """A message was addressed to an agent id or role that is not in the run's directory."""


class NotJSON(CfnError, TypeError):
    """A message body (or a status field) is not a JSON value; the message names the type."""


class ReceiveTimeout(CfnError, TimeoutError):
    """``agent.receive(timeout=...)`` found no matching message in time."""


class RequestTimeout(CfnError, TimeoutError):
    """``agent.request(...)`` got no reply in time."""


class PeerGone(CfnError):
    """``agent.request(...)``: the peer left the run's directory before it replied."""


class ResourceLimitError(CfnError):
    """The machine cannot hold the requested agents (file descriptors, processes)."""


class TaskFailed(CfnError):
    """A submitted task failed (``Future.result()`` raises it): ``task``, ``error`` and ``agent`` say which and why.

    ``skipped`` is true when the task never ran because a task it waited for (``after``,
    ``needs``) failed or was cancelled.
    """

    def __init__(self, task: str, error: str | None, agent: str | None = None, skipped: bool = False):
        super().__init__(f"task {task} failed: {error}" if not skipped else f"task {task} skipped: {error}")
        self.task, self.error, self.agent, self.skipped = task, error, agent, skipped


def _cancelled_base():
    from concurrent.futures import CancelledError  # here: agents import this module, and seldom need it

    return CancelledError


class Cancelled(CfnError, _cancelled_base()):
    """A task was cancelled (``Coordinator.cancel``, ``cfn cancel``).

    Raised inside a Python handler at its next agent call (``agent.send``, ``receive``,
    ``status`` ...) once its task is cancelled, and by ``Future.result()`` of a task
    cancelled while it ran.  A ``concurrent.futures.CancelledError``, so code that
    catches that catches this too.
    """


def did_you_mean(word: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    import difflib  # here: `cfn msg`, which imports this module, must start fast

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
