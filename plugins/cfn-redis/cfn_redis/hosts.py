"""Coordinator side of many machines: which host runs which agent, and noticing hosts die.

A ``cfn agent`` process registers its host in ``cfn:{RUN}:hosts`` with a
capacity and keeps ``cfn:{RUN}:lease:HOST`` alive.  When the kernel launches an
agent (``cfn_launch_agent``), :class:`Placement` puts it on a joined host with
free room (sticky: a replacement goes back to the same host while it lives),
else on the coordinator's machine (up to ``[redis] local_agents``).  A remote
agent's handle has no pid to watch; instead the host reports ``started`` and
``exited`` events, and a host whose lease expires has all its agents reported
dead, so the kernel relaunches them elsewhere and the new host's relay
reclaims their unsettled entries.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import defaultdict

from cfn_core import AgentHandle, BusError, CfnError

from . import keys

log = logging.getLogger("cfn.redis")

_REFRESH = 0.25


class NoRoom(CfnError):
    """No joined host has room and the coordinator's machine may not run more agents."""


class RemoteAgent:
    """``AgentHandle.remote`` of an agent running on a `cfn agent` host."""

    def __init__(self, placement: "Placement", host: str, token: str):
        self.placement = placement
        self.host = host
        self.token = token

    def kill(self, handle, reason: str) -> None:
        if self.placement.bus.failed:
            return  # unreachable; the next tick counts it gone
        try:
            self.placement.request(self.host, op="kill", id=handle.id, token=self.token)
        except BusError as exc:
            self.placement.bus.failed = self.placement.bus.failed or str(exc)


class Placement:
    def __init__(self, bus, settings):
        self.bus = bus
        self.settings = settings
        self.hosts: dict[str, dict] = {}
        self.alive: set[str] = set()
        self.used: dict[str, int] = defaultdict(int)
        self.local = 0
        self.where: dict[str, str | None] = {}
        self.events_from = b"0-0"
        self.next_refresh = 0.0
        self.launched_remote = 0
        self.hosts_seen: set[str] = set()
        self.hosts_lost: set[str] = set()
        self.warned_no_room = False

    # ------------------------------------------------------------------ hosts

    def refresh(self, ctx=None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_refresh:
            return
        self.next_refresh = now + _REFRESH
        run = self.bus.run_id

        def read(r):
            hosts = r.hgetall(keys.run_key(run, "hosts"))
            names = sorted(h.decode() for h in hosts)
            leases = r.mget([keys.run_key(run, f"lease:{h}") for h in names]) if names else []
            return hosts, names, leases

        hosts, names, leases = self.bus.link.call(read)
        self.hosts = {h.decode(): json.loads(v) for h, v in hosts.items()}
        alive = {h for h, lease in zip(names, leases) if lease is not None and h not in self.hosts_lost}
        self.hosts_seen |= alive
        gone = self.alive - alive
        self.alive = alive
        for host in gone:
            self.hosts_lost.add(host)
            log.warning("host %s left or missed its lease; its agents are relaunched elsewhere", host)
            if ctx is not None:
                for handle in list(ctx.agents.values()):
                    if handle.alive and getattr(handle.remote, "host", None) == host:
                        ctx.reap(handle)

    def request(self, host: str, **fields) -> None:
        self.bus.link.call(lambda r: r.xadd(keys.run_key(self.bus.run_id, f"ctl:{host}"), fields))

    def choose(self, agent_id: str) -> str | None:
        """A joined host with room for ``agent_id``, or None for this machine."""
        self.refresh()
        prev = self.where.get(agent_id)
        if prev is not None and prev in self.alive:
            return prev
        free = {h: self.hosts[h].get("capacity", 0) - self.used[h] for h in self.alive if h in self.hosts}
        best = max(free, key=lambda h: (free[h], h), default=None)
        if best is not None and free[best] > 0:
            return best
        limit = self.settings.local_agents
        if limit < 0 or self.local < limit:
            return None
        room = sum(max(v, 0) for v in free.values())
        raise NoRoom(
            f"no room for agent {agent_id}: [redis] local_agents = {limit} on the coordinator's machine are in use and "
            f"{len(self.alive)} joined host(s) have {room} free slot(s); start more `cfn agent --agents N` or raise local_agents"
        )

    def launch(self, ctx, agent_id: str):
        try:
            host = self.choose(agent_id)
        except NoRoom as exc:
            previous = ctx.agents.get(agent_id)
            if previous is not None and previous.outstanding:
                raise  # a replacement: the kernel fails the tasks it held, with this reason
            # a spawn failure like any other (the round goes on with the agents it has, and reports
            # this one), not an error that ends the session: cfn-pool pre-spawns before hosts join
            if not self.warned_no_room:
                self.warned_no_room = True
                log.warning("%s", exc)
            handle = AgentHandle(id=agent_id, pid=None)
            handle.info["error"] = str(exc)
            return handle
        self.where[agent_id] = host
        if host is None:
            self.local += 1
            return None
        token = f"{agent_id}.{secrets.token_hex(4)}"
        self.request(host, op="launch", id=agent_id, token=token)
        self.used[host] += 1
        self.launched_remote += 1
        handle = AgentHandle(id=agent_id, pid=None, remote=RemoteAgent(self, host, token))
        handle.info["host"] = host
        return handle

    def exited(self, handle) -> None:
        if "error" in handle.info:
            return  # never started (no room)
        remote = getattr(handle, "remote", None)
        if isinstance(remote, RemoteAgent):
            self.used[remote.host] -= 1
        elif self.where.get(handle.id, "?") is None:
            self.local -= 1

    # ------------------------------------------------------------------ events

    def poll(self, ctx) -> None:
        run = self.bus.run_id
        events_key = keys.run_key(run, "events")
        resp = self.bus.link.call(lambda r: r.xread({events_key: self.events_from}, count=10_000))
        for _, entries in resp or ():
            for eid, fields in entries:
                self.events_from = eid
                self._on_event(ctx, {k.decode(): v.decode() for k, v in fields.items()})
        self.refresh(ctx)

    def _on_event(self, ctx, ev: dict) -> None:
        handle = ctx.agents.get(ev.get("id", ""))
        remote = getattr(handle, "remote", None)
        if handle is None or not isinstance(remote, RemoteAgent) or remote.token != ev.get("token"):
            return  # an earlier incarnation's news
        if ev.get("op") == "started":
            try:
                handle.pid = int(ev["pid"])
            except (KeyError, ValueError):
                pass
        elif ev.get("op") == "exited" and handle.alive:
            code = ev.get("code")
            if ev.get("reason") and handle.state == "starting":
                ctx.spawn_failures[handle.id] = ev["reason"]
            ctx.reap(handle, int(code) if code not in (None, "", "None") else None)

    def wait_hosts(self, ctx, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.refresh(force=True)
        if len(self.alive) < count:
            log.warning(
                "waiting for %d `cfn agent` host(s) to join run %s (%d joined): cfn agent --bus URL --run %s --agents N",
                count, self.bus.run_id, len(self.alive), self.bus.run_id,
            )
        while len(self.alive) < count:
            if time.monotonic() >= deadline:
                raise BusError(
                    f"only {len(self.alive)} of {count} `cfn agent` host(s) joined run {self.bus.run_id} within "
                    f"{timeout:g}s ([redis] wait_hosts, [run] spawn_timeout)"
                )
            ctx.pump(0.05)
            self.refresh(ctx, force=True)

    def abandon(self, ctx) -> None:
        """The bus failed: remote agents cannot be reached; report them gone (their hosts stop them)."""
        for handle in list(ctx.agents.values()):
            if handle.alive and isinstance(handle.remote, RemoteAgent):
                ctx.reap(handle)

    def figures(self) -> dict:
        return {
            "hosts_joined": len(self.hosts_seen),
            "hosts_lost": len(self.hosts_lost),
            "remote_launches": self.launched_remote,
        }
