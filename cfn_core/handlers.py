"""Handlers shipped with the kernel (``[workload] handler = "cfn_core.handlers:echo"``)."""

from __future__ import annotations

from typing import Any


def echo(payload: Any) -> Any:
    """Return the payload unchanged: the trivial workload the benchmarks measure."""
    return payload


def length(payload: Any) -> int:
    """Return the payload's length: a result that costs nothing to send back."""
    return len(payload) if hasattr(payload, "__len__") else 0


class _PeerSum:
    """A mesh handler that checks its own traffic: each peer message carries a
    number, and the result is the sum this agent received (the totals over all
    agents must match what was sent)."""

    def __call__(self, payload: Any) -> Any:
        return payload

    @staticmethod
    def scatter(payload: Any, peers: list[str]) -> list[int]:
        return list(range(1, len(peers) + 1))

    @staticmethod
    def gather(payload: Any, bodies: list[Any]) -> int:
        return sum(b for b in bodies if isinstance(b, int))


#: ``handler = "cfn_core.handlers:peer_sum"``
peer_sum = _PeerSum()
