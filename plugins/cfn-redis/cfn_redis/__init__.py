"""cfn-redis: the message bus on Redis Streams, and agents on many machines.

Enable with ``plugins = ["redis"]`` and ``[redis] url = "redis://host:6379/0"``
(or ``CFN_REDIS_URL``).  Hook implementations:

* ``cfn_settings`` / ``cfn_configure``: the ``[redis]`` table, URL checked at start;
* ``cfn_add_commands``: ``cfn agent`` (:mod:`cfn_redis.cli`), there whenever
  this distribution is installed;
* ``cfn_bus``: the coordinator gets a :class:`~cfn_redis.bus.HubBus` (creates
  the run in Redis, starts this machine's relay); every agent a
  :class:`~cfn_redis.bus.LocalBus` on its machine's spool (no Redis client in
  agents: see :mod:`cfn_redis.relay`);
* ``cfn_launch_agent`` (tryfirst): places an agent on a joined ``cfn agent``
  host with room, else hands on to the local launcher (baseline, pool...);
* ``cfn_tick``: relay health, Redis reachability, host events and leases;
* ``cfn_coordination_start``: waits for ``[redis] wait_hosts`` hosts;
* ``cfn_agent_exited``: frees the host's slot;  ``cfn_report``: figures.

``cfn_send``/``cfn_read``/``cfn_flush`` are deliberately not replaced: the
baseline's (and cfn-batch's, cfn-shard's) go through ``bus.deliver``/``bus.read``,
which this bus maps onto streams, so those plugins compose unchanged.
This module imports neither ``redis`` nor the coordinator: agents load it.
The bus module is imported here, not in ``cfn_bus``: a zygote (cfn-pool) then
has it loaded before it forks, instead of every forked agent importing it.
"""

from __future__ import annotations

from cfn_core import hookimpl

from .bus import HubBus, LocalBus

__version__ = "0.1.0"

_STATE = "redis"


@hookimpl
def cfn_settings():
    from .settings import RedisSettings

    return {"redis": RedisSettings}


@hookimpl
def cfn_add_commands(subparsers):
    from .cli import add_parser  # cheap, but only the `cfn` command needs it

    add_parser(subparsers)


@hookimpl
def cfn_configure(config):
    from .client import check_url

    check_url(config.section("redis").url)


@hookimpl
def cfn_bus(config, run_ref):
    if run_ref is None:
        return HubBus.open(config)
    return LocalBus.attach(run_ref, max_message_bytes=config.bus.max_message_bytes)


def _placement(ctx):
    pl = ctx.state.get(_STATE)
    if pl is None:
        from .hosts import Placement

        pl = ctx.state[_STATE] = Placement(ctx.bus, ctx.config.section("redis"))
    return pl


def _is_hub(ctx) -> bool:
    return isinstance(ctx.bus, HubBus)


@hookimpl(tryfirst=True)
def cfn_launch_agent(ctx, agent_id):
    if not _is_hub(ctx):
        return None
    return _placement(ctx).launch(ctx, agent_id)


@hookimpl
def cfn_agent_exited(ctx, agent, reason):
    if _is_hub(ctx):
        _placement(ctx).exited(agent)


@hookimpl
def cfn_tick(ctx, now):
    if not _is_hub(ctx):
        return
    from cfn_core import BusError

    bus = ctx.bus
    if bus.failed:
        _placement(ctx).abandon(ctx)  # hosts are unreachable: count their agents gone, shut down
        return
    try:
        bus.check()
        _placement(ctx).poll(ctx)
    except BusError as exc:
        bus.failed = bus.failed or str(exc)
        raise


@hookimpl
def cfn_coordination_start(ctx, round):
    settings = ctx.config.section("redis")
    if round == 1 and settings.wait_hosts and _is_hub(ctx):
        _placement(ctx).wait_hosts(ctx, settings.wait_hosts, ctx.config.run.spawn_timeout)


@hookimpl
def cfn_report(ctx):
    if not _is_hub(ctx):
        return None
    figures = {"run": ctx.bus.run_id, "reconnects": ctx.bus.link.reconnects,
               "relay_relaunches": ctx.bus.relaunches}
    figures.update(_placement(ctx).figures())
    return {"redis": figures}
