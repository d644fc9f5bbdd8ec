"""cfn-shard: spread inboxes over shard directories and split the coordinator's fan-in.

Enable with ``plugins = ["shard"]``; settings in ``[shard]`` (see :class:`ShardSettings`).
Acts on both sides; the layout and the strategies are in :mod:`cfn_shard.layout`.

Hook implementations:

* ``cfn_settings`` / ``cfn_configure``: the ``[shard]`` table.
* ``cfn_route``: ``shard-<k>/<agent_id>`` with ``k = shard_of(agent_id)``,
  computed from the id alone.  The coordinator's inbox is split: an agent
  writes to ``shard-<k>/_coordinator`` of its *own* shard, so ``count`` locks
  share the fan-in of every result instead of one.  A shard directory that
  cannot be used (a non-directory in its place, mkdir refused) sends the
  process to ``shard-fallback/<agent_id>`` instead (counted).
* ``cfn_read`` (a bus whose ``split_inboxes`` is true, such as shm; others read at ``ctx.route`` themselves):
  an agent reads its shard inbox and, once it exists, its fallback inbox; the
  coordinator reads all ``count`` parts of its inbox.
  Records of secondary inboxes carry ``(inbox_id, receipt)`` receipts, which
  the bus settles in the right inbox.
* ``cfn_session_start`` (coordinator) / ``cfn_agent_init`` (agents): learn
  the run directory and the process's own id, create the shard directories
  (coordinator), and switch on the bus's flock-wait measurement.
* ``cfn_report``: agents and messages per shard, balance (max/mean), lock
  wait per shard, fallbacks; also exported as ``cfn_shard_*`` metrics.
"""

from __future__ import annotations

import os
import stat

from attrs import define
from cfn_core import COORDINATOR_ID, BusError, ConfigError, decode_records, hookimpl, setting

from .layout import STRATEGIES, balance, fallback_location, location, shard_dir, shard_of

__all__ = ["ShardSettings", "shard_of"]

NAME = "shard"


@define(frozen=True)
class ShardSettings:
    """``[shard]``: inboxes spread over shard directories (cfn-shard)."""

    count: int = setting(8, "shard directories inboxes are spread over", min=1, max=4096)
    strategy: str = setting(
        "hash", "how an agent id picks its shard (computed by every process alike)", choices=STRATEGIES
    )
    split_coordinator: bool = setting(
        True, "split the coordinator's inbox into one per shard, written by that shard's agents (cuts the fan-in lock)"
    )


@hookimpl
def cfn_feature_flags():
    return ("CFN_ENABLE_SHARDING",)


@hookimpl
def cfn_settings():
    return {NAME: ShardSettings}


@hookimpl
def cfn_configure(config):
    s = config.section(NAME)
    if s.strategy not in STRATEGIES:  # the loader checks too; a hand-built config may not have
        raise ConfigError(f"[shard] strategy = {s.strategy!r}: must be one of {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------------- this process


class _Process:
    """What ``cfn_route`` (which only gets the config) needs to know about this process."""

    def __init__(self) -> None:
        self.pid = 0
        self.run_dir: str | None = None  # a str: pathlib's code would be copied into every forked agent
        self.self_id: str | None = None
        self.counters: dict = {}
        self.split = False  # the bus can spread an inbox over locations (Bus.split_inboxes)

    def bind(self, ctx) -> None:
        self.pid = os.getpid()
        run_dir = getattr(ctx.bus, "run_dir", None)
        self.run_dir = os.fspath(run_dir) if run_dir is not None else None
        self.self_id = ctx.self_id
        self.split = bool(getattr(ctx.bus, "split_inboxes", False))
        self.counters = ctx.counters if ctx.side == "agent" else ctx.state.setdefault("shard.counters", {})

    def current(self) -> bool:
        return self.pid == os.getpid()


_proc = _Process()


class _LockWaitView:
    """Lets ``ShmBus.deliver`` add flock waits straight into ``counters`` under ``shard.lock_ns.<dir>``."""

    __slots__ = ("c",)

    def __init__(self, counters: dict):
        self.c = counters

    def get(self, key, default=0):
        return self.c.get("shard.lock_ns." + key, default)

    def __setitem__(self, key, value):
        self.c["shard.lock_ns." + key] = value


def _bind(ctx) -> None:
    # counters are created when first counted (another thread, cfn-batch's flusher, may add a
    # lock wait while the kernel copies the dict: it copies in one step, see cfn_core.figures)
    _proc.bind(ctx)
    if hasattr(ctx.bus, "lock_wait"):
        ctx.bus.lock_wait = _LockWaitView(_proc.counters)


def _usable(k: int) -> bool:
    """Can this run's shard directory ``k`` hold inboxes?  Creates it if missing."""
    if _proc.run_dir is None or not _proc.current():
        return True  # not the shm bus (or not bound yet): nothing to check
    path = f"{_proc.run_dir}/{shard_dir(k)}"  # not os.path.join: its Python code would be copied into every agent
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return False
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- hooks


@hookimpl
def cfn_route(agent_id, config):
    s = config.section(NAME)
    if agent_id == COORDINATOR_ID:
        me = _proc.self_id if _proc.current() else None
        if not s.split_coordinator or not _proc.split or me is None or me == COORDINATOR_ID:
            k = 0
        else:
            k = shard_of(me, s.count, s.strategy, config.workload.seed)
    else:
        k = shard_of(agent_id, s.count, s.strategy, config.workload.seed)
    if _usable(k):
        return location(agent_id, k)
    if _proc.current():
        _proc.counters["shard.fallbacks"] = _proc.counters.get("shard.fallbacks", 0) + 1
    return fallback_location(agent_id)


@hookimpl
def cfn_session_start(ctx):
    s = ctx.config.section(NAME)
    _bind(ctx)
    if _proc.run_dir is not None:
        for k in range(s.count):
            _usable(k)  # create them now, not in 500 agents at once
    ctx.state["shard.agents"] = {}
    ctx.metrics.registry.register(_ShardCollector(ctx))


@hookimpl
def cfn_agent_init(ctx):
    _bind(ctx)


@hookimpl
def cfn_read(ctx, agent_id):
    bus = ctx.bus
    if not getattr(bus, "split_inboxes", False):
        return None  # the transport reads by inbox id alone (at ctx.route, our location): no split, no fallback
    s = ctx.config.section(NAME)
    if agent_id == COORDINATOR_ID and s.split_coordinator:
        records = []
        per_shard = ctx.state.setdefault("shard.coordinator_in", [0] * s.count)
        broken = ctx.state.setdefault("shard.broken_parts", set())
        for k in range(s.count):
            inbox = f"{COORDINATOR_ID}.s{k}"
            try:
                got = bus.read(inbox, location(COORDINATOR_ID, k))
            except (BusError, OSError):
                # its directory is unusable: that shard's agents write to the fallback inbox
                # (tried again on every read, in case the directory comes back)
                if k not in broken:
                    broken.add(k)
                    _proc.counters["shard.fallbacks"] = _proc.counters.get("shard.fallbacks", 0) + 1
                continue
            if got:
                per_shard[k] += len(got)
                records += [(raw, (inbox, r)) for raw, r in got]
        records += _fallback_records(ctx, agent_id)
        messages = decode_records(ctx, agent_id, records)
        _take_agent_figures(ctx, messages)
        return messages
    loc = ctx.route(agent_id)
    records = [] if loc == fallback_location(agent_id) else bus.read(agent_id, loc)
    records += _fallback_records(ctx, agent_id)
    if records and _proc.current():
        _proc.counters["shard.messages"] = _proc.counters.get("shard.messages", 0) + len(records)
    messages = decode_records(ctx, agent_id, records)
    if agent_id == COORDINATOR_ID:
        _take_agent_figures(ctx, messages)
    return messages


def _fallback_records(ctx, agent_id: str) -> list:
    """Records senders put in ``agent_id``'s fallback inbox (read under the id ``<agent_id>.fb``)."""
    seen = ctx.state.get("shard.fallback_seen")
    if seen is None or agent_id not in seen:
        run_dir = getattr(ctx.bus, "run_dir", None)
        # os.access, not os.path.exists: one system call and no Python code to copy into a forked agent
        if run_dir is None or not os.access(f"{run_dir}/{fallback_location(agent_id)}", os.F_OK):
            return []
        ctx.state.setdefault("shard.fallback_seen", set()).add(agent_id)
    inbox = f"{agent_id}.fb"
    return [(raw, (inbox, r)) for raw, r in ctx.bus.read(inbox, fallback_location(agent_id))]


# ---------------------------------------------------------------------- figures


def _take_agent_figures(ctx, messages) -> None:
    latest = ctx.state.get("shard.agents")
    if latest is None:
        return
    for msg in messages:
        if msg.kind != "result" or not isinstance(msg.body, dict) or not isinstance(msg.body.get("counters"), dict):
            continue
        process = msg.id.rsplit(".", 1)[0]
        seen = latest.get((msg.src, process))
        if seen is None or msg.seq > seen[0]:
            snap = {k: v for k, v in msg.body["counters"].items() if k.startswith("shard.") and isinstance(v, int)}
            latest[(msg.src, process)] = (msg.seq, snap)


def shard_figures(ctx) -> dict:
    """Per-shard figures of the session so far (what ``cfn_report`` returns)."""
    s = ctx.config.section(NAME)
    seed = ctx.config.workload.seed
    count = s.count
    agents = [0] * count
    for agent_id in ctx.agents:
        agents[shard_of(agent_id, count, s.strategy, seed)] += 1
    messages = [0] * count
    lock_ns: dict[str, int] = {}
    fallbacks = 0
    snapshots = [snap for (src, _), (_, snap) in ctx.state.get("shard.agents", {}).items()]
    srcs = [src for (src, _) in ctx.state.get("shard.agents", {})]
    for src, snap in zip(srcs, snapshots):
        messages[shard_of(src, count, s.strategy, seed)] += snap.get("shard.messages", 0)
    split = s.split_coordinator and bool(getattr(ctx.bus, "split_inboxes", False))
    coordinator_in = ctx.state.get("shard.coordinator_in", [0] * count)
    for k in range(count):
        messages[k] += coordinator_in[k] if split else 0
    own = dict(ctx.state.get("shard.counters", {}))
    for snap in [own, *snapshots]:
        fallbacks += snap.get("shard.fallbacks", 0)
        for key, v in snap.items():
            if key.startswith("shard.lock_ns."):
                d = key[len("shard.lock_ns.") :]
                lock_ns[d] = lock_ns.get(d, 0) + v
    return {
        "count": count,
        "strategy": s.strategy,
        "split_coordinator": split,
        "agents_per_shard": agents,
        "balance_agents": _round(balance(agents)),
        "messages_per_shard": messages,
        "balance_messages": _round(balance(messages)),
        "coordinator_inbox_per_shard": list(coordinator_in),
        "lock_wait_ms_per_shard": {d: round(ns / 1e6, 3) for d, ns in sorted(lock_ns.items()) if ns},
        "lock_wait_ms_total": round(sum(lock_ns.values()) / 1e6, 3),
        "fallbacks": fallbacks,
        "agent_processes": len(snapshots),
    }


def _round(x):
    return None if x is None else round(x, 4)


@hookimpl
def cfn_report(ctx):
    if "shard.agents" not in ctx.state:
        return None
    return {NAME: shard_figures(ctx)}


class _ShardCollector:
    """``cfn_shard_*`` metrics on the coordinator's registry."""

    def __init__(self, ctx):
        self.ctx = ctx

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        f = shard_figures(self.ctx)
        messages = CounterMetricFamily("cfn_shard_messages", "Messages read from each shard's inboxes", labels=["shard"])
        agents = GaugeMetricFamily("cfn_shard_agents", "Agents whose inbox is in each shard", labels=["shard"])
        for k in range(f["count"]):
            messages.add_metric([str(k)], f["messages_per_shard"][k])
            agents.add_metric([str(k)], f["agents_per_shard"][k])
        yield messages
        yield agents
        wait = CounterMetricFamily(
            "cfn_shard_lock_wait_seconds", "Time senders waited for inbox locks, by shard directory", labels=["shard"]
        )
        for d, ms in f["lock_wait_ms_per_shard"].items():
            wait.add_metric([d], ms / 1000)
        yield wait
        yield GaugeMetricFamily(
            "cfn_shard_balance", "max/mean of messages per shard (1.0 is perfect)", value=f["balance_messages"] or 0
        )
        yield CounterMetricFamily("cfn_shard_fallbacks", "Routes sent to the fallback location", value=f["fallbacks"])
