"""``cfn agent``: lend this machine's agents to a running coordination over Redis.

::

    cfn agent --bus redis://:secret@10.0.0.5:6379/0 --agents 200 [--run RUN]

joins the newest live run in that Redis (or ``--run``), registers this host
with room for ``--agents`` agents, runs the host's relay, and starts agents
when the coordinator places them here.  It leaves when the run ends (exit 0),
on SIGINT/SIGTERM (its agents are stopped and relaunched elsewhere by the
coordinator), or when Redis loses the run (exit 1, the reason on stderr).

Added to ``cfn`` by this plugin's ``cfn_add_commands`` hook whenever cfn-redis
is installed; imports nothing heavy until run.  When the run's plugins offer a
fork server (``cfn_agent_forker``: the pooling plugin's zygote), this host's
agents are forked from one too.
"""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "agent",
        help="run agents on this machine for a coordination on the Redis bus (plugin cfn-redis)",
        description="Join a running coordination through Redis and run its agents here.",
    )
    p.add_argument("--bus", metavar="URL", help="redis://[:password@]host:port/db or rediss://... (default: CFN_REDIS_URL, else [redis] url)")
    p.add_argument("--agents", type=int, default=100, metavar="N", help="most agents this machine runs at once (default 100)")
    p.add_argument("--run", metavar="RUN", help="run id to join (default: the newest live run)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait for a run to appear (default 60)")
    p.add_argument("--root", metavar="DIR", help="where this machine's spool lives (default /dev/shm)")
    p.add_argument("--config", metavar="PATH", help="cfn.toml to take [redis] url from (default: found upward from here)")
    p.set_defaults(func=cmd_agent)


def _url(args) -> str:
    if args.bus:
        return args.bus
    if os.environ.get("CFN_REDIS_URL"):
        return os.environ["CFN_REDIS_URL"]
    from cfn_core import load_config

    return load_config(args.config).section("redis").url


def find_run(client, run: str | None, wait: float, url: str) -> str:
    """The run to join: ``run`` once it is live, else the newest live one; waits up to ``wait`` seconds."""
    import time

    from cfn_core import BusError

    from . import keys
    from .client import describe

    deadline = time.monotonic() + wait
    while True:
        candidates = [run] if run else [r.decode() for r in client.zrevrange(keys.RUNS, 0, 20)]
        for candidate in candidates:
            if client.exists(keys.run_key(candidate, "meta")):
                return candidate
        if time.monotonic() >= deadline:
            what = f"run {run}" if run else "a live run"
            raise BusError(f"found no {what} in Redis at {describe(url)} within {wait:g}s (start `cfn run` with plugins = [\"redis\"] first)")
        time.sleep(0.2)


def _forker(config, spool):
    """A fork server for this host's agents when one of the run's plugins offers it (``cfn_agent_forker``), else None."""
    import logging

    from cfn_core import make_plugin_manager

    try:
        # the run's enabled plugins, as its agents load them (they must be installed here too)
        pm = make_plugin_manager(config)
        return pm.hook.cfn_agent_forker(config=config, run_ref=os.fspath(spool))
    except Exception as exc:  # fresh interpreters still work
        logging.getLogger("cfn.redis").warning("cannot start a fork server on this host (%s); agents start as fresh interpreters", exc)
        return None


def cmd_agent(args) -> int:
    import json
    import secrets
    import signal
    import socket

    from cfn_core import CfnError, ShmBus, config_from_state, ensure_fd_limit

    from . import keys
    from .bus import RUN_STATE
    from .client import check_url, close, connect, describe
    from .relay import Relay

    if args.agents < 1:
        raise CfnError(f"--agents {args.agents}: must be at least 1")
    url = _url(args)
    check_url(url, "--bus")
    client = connect(url)
    try:
        run = find_run(client, args.run, args.wait, url)
        doc = client.hget(keys.run_key(run, "state"), "config")
    finally:
        close(client)
    if doc is None:
        raise CfnError(f"run {run} in Redis at {describe(url)} has no configuration yet; is its coordinator starting?")
    config = config_from_state(doc, f"run {run} in Redis at {describe(url)}")  # the plugins must be installed here too
    s = config.section("redis")
    settings = {k: getattr(s, k) for k in ("lease", "key_ttl", "reconnect_timeout", "max_deliveries", "pipeline", "read_count")}
    ensure_fd_limit(2 * args.agents + 256, f"cfn agent --agents {args.agents}")
    spool = ShmBus.create(args.root, max_message_bytes=config.bus.max_message_bytes)
    host_id = f"{socket.gethostname()[:24]}-{os.getpid()}-{secrets.token_hex(3)}"
    relay = None
    try:
        spool.put_state(RUN_STATE, json.dumps({"run": run, "host": host_id}).encode())
        relay = Relay(url, run, os.fspath(spool.run_dir), host_id, settings, capacity=args.agents)
        relay.sync_state()
        relay.forker = _forker(config, spool.run_dir)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: relay.stop())
        relay.start()
        work = f"command {config.workload.command!r}" if config.workload.command else f"handler {config.workload.handler}"
        print(f"cfn agent: joined run {run} on {describe(url)} as host {host_id}, room for {args.agents} agents, "
              f"running {work}", file=sys.stderr, flush=True)
        code = relay.run_forever()
    finally:
        spool.destroy()
    if relay.fatal:
        print(f"cfn agent: error: {relay.fatal}", file=sys.stderr)
        return 1
    forked = f" ({relay.stats['forked']} forked from a zygote)" if relay.stats["forked"] else ""
    print(f"cfn agent: run {run} ended; {relay.stats['launched']} agent(s) started here{forked}", file=sys.stderr)
    return code
