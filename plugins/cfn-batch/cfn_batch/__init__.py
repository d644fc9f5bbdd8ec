"""cfn-batch: buffer outgoing messages per destination and write each buffer at once.

Enable with ``plugins = ["batch"]``; settings in ``[batch]`` (see :class:`BatchSettings`).
Acts on both sides: the coordinator and every agent run a
:class:`~cfn_batch.batcher.Batcher` (one buffer per destination, one locked
write per destination per flush, send order kept, a flusher thread for the
timeout, started when first needed).

Hook implementations:

* ``cfn_settings`` / ``cfn_configure``: the ``[batch]`` table and its checks.
* ``cfn_session_start`` (coordinator): create its batcher (its flusher thread
  starts the first time a record stays buffered) and register the
  ``cfn_batch_*`` metrics; ``cfn_agent_init`` (agents, also after a fork): drop
  an inherited batcher (an agent builds its own when it first has company).
* ``cfn_send``: encode and buffer; a buffer that reaches the (adaptive) size is
  delivered by the sender at once.  A process without a batcher writes a lone
  message at once without building one (nothing sent since its latest flush:
  an agent answering one task at a time never builds one).  Returns ``True``.
* ``cfn_flush``: deliver every buffer (``explicit`` before each sleep,
  ``shutdown`` before exit).
* ``cfn_agent_exit`` / ``cfn_session_finish``: final flush, stop the flusher;
  anything sent later is delivered at once.
* agents' ``batch.*`` counters reach the coordinator through the kernel
  (``ctx.agent_counters("batch.")``: every result's snapshot, then each
  process's final counters as it exits), so the report covers the whole run.
* ``cfn_report``: messages per batch, flushes by reason, added latency,
  flusher deaths and restarts.
"""

from __future__ import annotations

import os

from attrs import define
from cfn_core import ConfigError, hookimpl, setting

from .batcher import Batcher, optimal_batch_size
from .stats import P, BatchCollector, BatchStats, count_unbuffered, figures, merge, only_batch

__all__ = ["BatchSettings", "Batcher", "optimal_batch_size"]

NAME = "batch"


@define(frozen=True)
class BatchSettings:
    """``[batch]``: buffered, destination-grouped sends (cfn-batch)."""

    size: int = setting(
        50, "messages buffered per destination before they are written (the floor of the adaptive size)", min=1, max=1_000_000
    )
    timeout_ms: int = setting(
        100, "longest time a buffered message waits before it is written, in milliseconds", env=("CFN_BATCH_TIMEOUT",), min=1, max=600_000
    )
    max_size: int = setting(
        500, "most messages one destination's buffer holds; when full the sender writes it (never drops)", min=1, max=1_000_000
    )
    adaptive: bool = setting(True, "raise the batch size from size toward max_size when the observed message rate allows")


@hookimpl
def cfn_settings():
    return {NAME: BatchSettings}


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_BATCHING",)


@hookimpl
def cfn_configure(config):
    s = config.section(NAME)
    if s.max_size < s.size:
        raise ConfigError(
            f"[batch] max_size = {s.max_size} is smaller than [batch] size = {s.size}: "
            "max_size caps the buffer, so it must be >= size"
        )


# ---------------------------------------------------------------------- the process's batcher


#: ``ctx.state`` key: a message was written without a batcher since this process's latest flush
_UNFLUSHED = "batch.unflushed"


def _counters(ctx) -> dict:
    return ctx.counters if ctx.side == "agent" else ctx.state.setdefault("batch.counters", {})


def _new_batcher(ctx, counters: dict) -> Batcher:
    s = ctx.config.section(NAME)
    stats = BatchStats(counters, min(s.size, s.max_size))
    batcher = Batcher(ctx.bus, ctx.route, s, ctx.config.bus.max_message_bytes, stats)
    ctx.state[NAME] = batcher
    return batcher


def _batcher(ctx) -> Batcher:
    batcher = ctx.state.get(NAME)
    if batcher is None or batcher.pid != os.getpid():
        # first use without an init hook, or a fork inherited the parent's batcher: start afresh
        # (a child never re-sends what its parent buffered)
        batcher = _new_batcher(ctx, _counters(ctx))  # its flusher thread starts when a record first stays buffered
    return batcher


@hookimpl
def cfn_agent_init(ctx):
    # a forked agent drops what it inherited; its batcher is made at its first send (a hosted
    # agent never sends through its own ctx: its host's batcher batches for all its agents)
    ctx.state.pop(NAME, None)


@hookimpl
def cfn_session_start(ctx):
    batcher = _batcher(ctx)

    def totals() -> dict:
        # the coordinator's own figures and every agent process's (the kernel gathers those)
        return merge([only_batch(dict(batcher.stats.c)), *ctx.agent_counters(P).values()])

    ctx.state["batch.totals"] = totals
    ctx.metrics.registry.register(BatchCollector(totals))


@hookimpl
def cfn_send(ctx, messages, flush):
    batcher = ctx.state.get(NAME)
    if batcher is None or batcher.pid != os.getpid():
        unflushed = ctx.state.get(_UNFLUSHED)
        if len(messages) == 1 and (flush or not unflushed):
            _write_unbuffered(ctx, messages[0], flush)
            return True
        batcher = _batcher(ctx)  # from now on this process batches
        if unflushed:  # a second send before the next flush: it continues the burst the first began
            batcher.continue_burst()
    batcher.send(messages, at_once=flush)
    return True


def _write_unbuffered(ctx, msg, flush: bool) -> None:
    """Write one message now, in a process that has no batcher yet and nothing buffered.

    What the batcher's leading edge does for a send that starts a burst, without
    building the batcher: an agent that answers one task at a time (a ready, then a
    result, each followed by the kernel's flush before it sleeps) never has two
    messages to coalesce, and in a forked agent building a batcher and running its
    code copies ~35 pages of the zygote.  The batcher is built by the first send that
    has company: a second one before the process's next flush, or several at once.
    A write that fails leaves the record in a new batcher's buffer (the next flush
    writes it, as for a batched record) and raises.
    """
    rec = msg.encode(ctx.config.bus.max_message_bytes)
    bus = ctx.bus
    try:
        bus.last_written = False
        bus.deliver(msg.dst, ctx.route(msg.dst), [rec])
    except BaseException:
        if not bus.last_written:
            _batcher(ctx).keep(msg.dst, rec)
        raise
    count_unbuffered(_counters(ctx), 1, len(rec))
    if not flush:
        ctx.state[_UNFLUSHED] = True


@hookimpl
def cfn_flush(ctx, reason):
    batcher = ctx.state.get(NAME)
    if batcher is not None and batcher.pid == os.getpid():
        batcher.flush(reason)
    elif _UNFLUSHED in ctx.state:
        del ctx.state[_UNFLUSHED]


@hookimpl
def cfn_agent_exit(ctx):
    batcher = ctx.state.get(NAME)
    if batcher is not None and batcher.pid == os.getpid():
        batcher.close()  # the final flush: counted in the final figures the kernel publishes next


@hookimpl
def cfn_session_finish(ctx):
    batcher = ctx.state.get(NAME)
    if batcher is not None and batcher.pid == os.getpid():
        batcher.close()


@hookimpl
def cfn_report(ctx):
    totals = ctx.state.get("batch.totals")
    batcher = ctx.state.get(NAME)
    if totals is None or batcher is None:
        return None
    s = ctx.config.section(NAME)
    out = figures(totals())
    out["coordinator"] = figures(only_batch(dict(batcher.stats.c)))
    out["agent_processes"] = len(ctx.agent_counters(P))
    out["settings"] = {"size": s.size, "timeout_ms": s.timeout_ms, "max_size": s.max_size, "adaptive": s.adaptive}
    return {NAME: out}
