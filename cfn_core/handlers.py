"""Handlers shipped with the kernel (``[workload] handler = "cfn_core.handlers:echo"``)."""

from __future__ import annotations

from typing import Any


def echo(payload: Any) -> Any:
    """Return the payload unchanged: the trivial workload the benchmarks measure."""
    return payload


def length(payload: Any) -> int:
    """Return the payload's length: a result that costs nothing to send back."""
    return len(payload) if hasattr(payload, "__len__") else 0
