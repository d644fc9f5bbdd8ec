"""Hosted agents, the coordinator's side: host processes and the handles of the agents they run.

A builtin plugin (registered in every process, like :mod:`cfn_core.builtin`; it acts on
the coordinator only).  For an agent whose role says ``host = "async"``
(docs/HOSTING.md) it replaces the start of an OS process per agent:

* ``cfn_launch_agent`` (tryfirst, for hosted roles only; ``None`` otherwise, so the
  baseline or cfn-pool starts process agents as before) picks the agent's host
  process (``_host.<role>.<k>``, ``k`` from the agent's number), starts that process
  on first use, queues an ``add`` order and returns a handle with ``remote`` set and
  no pidfd: the coordinator holds no process handle and no descriptor per hosted
  agent, only one pidfd per host;
* ``cfn_spawn`` (tryfirst) launches a batch's hosted agents all at once (one ``add``
  order per host) before it waits for them, so 10,000 agents start in one round trip;
* outside such a batch (the relaunch of an agent that died) an ``add`` is sent at once;
* ``cfn_tick`` reads the hosts' reports (inbox ``_hosts``: an agent task ended, the
  event loop lagged) and watches the hosts' pidfds.  A host that died takes its
  agents with it: each is reaped like a process agent that died, so the kernel re-runs
  its unfinished task on a replacement (a new host process with the same id);
* ``kill`` (the watchdog's task timeout) cancels one agent's asyncio task; the host
  reports it ended and the kernel restarts it, in the same host, with its task.  A host
  that does not answer a kill within ``[run] shutdown_timeout`` (its loop is blocked)
  is SIGKILLed, and all its agents are recovered as above;
* ``cfn_session_finish`` stops the hosted agents, then their hosts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zlib
from typing import Any

from .hookspecs import hookimpl
from .messages import HOSTS_INBOX
from .process import wait_readable
from .roles import role_of

log = logging.getLogger("cfn.hosting")

#: agents per add order while cfn_spawn launches a batch (cfn_core.host starts a hundred per turn)
_ADD_ORDER = 1000

_STATE_KEY = "cfn.hosting"


def is_hosted(config, agent_id: str) -> bool:
    return role_of(config, agent_id).host == "async"


class HostProcess:
    """One host process as the coordinator sees it (a real OS process, watched through a pidfd)."""

    def __init__(self, host_id: str, role: str):
        self.id = host_id
        self.role = role
        self.popen: subprocess.Popen | None = None
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.incarnation = 0
        self.adds: list[str] = []  # agent ids to send in the next add order (first launches of their ids)
        self.readds: list[str] = []  # ... and relaunches (a skip list may exist for them: cfn_core.agent.read_skip_list)
        self.kills: dict[str, float] = {}  # agent id -> when a kill order was sent, unanswered
        self.lags = 0
        self.worst_lag = 0.0

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.pidfd is not None


class HostManager:
    """The run's host processes; the ``remote`` of every hosted agent's handle."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.hosts: dict[str, HostProcess] = {}
        self.listening = False
        self.batching = False  # inside cfn_spawn: add orders wait for the batch's end
        self.launched: set[str] = set()  # every hosted agent id launched in this session

    # -------------------------------------------------------------- launching

    def host_for(self, agent_id: str) -> HostProcess:
        from .host import host_id

        role = role_of(self.ctx.config, agent_id)
        number = agent_id.rpartition("-")[2]
        index = int(number) - 1 if number.isdigit() else zlib.crc32(agent_id.encode())
        hid = host_id(role.name, index % role.hosts + 1)
        host = self.hosts.get(hid)
        if host is None:
            host = self.hosts[hid] = HostProcess(hid, role.name)
        return host

    def start_host(self, host: HostProcess) -> None:
        from .process import pidfd_open, start_process

        ctx = self.ctx
        if not self.listening:
            self.listening = True
            ctx.bus.listen(HOSTS_INBOX)  # reports are read every tick; the doorbell only has to exist
        cmd = [sys.executable, "-m", "cfn_core.host", "--run", ctx.run_ref, "--id", host.id, "--parent", str(os.getpid())]
        host.popen = start_process(cmd, run_ref=ctx.run_ref, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), close_fds=True)
        host.pid = host.popen.pid
        host.pidfd = pidfd_open(host.pid)
        host.incarnation += 1
        host.kills.clear()
        ctx.events.emit("host_started", host=host.id, role=host.role, pid=host.pid, incarnation=host.incarnation)
        ctx.counters["hosts_started"] += 1

    def launch(self, agent_id: str):
        from .context import AgentHandle

        host = self.host_for(agent_id)
        if not host.alive:
            self.start_host(host)
        if agent_id in self.launched:
            host.readds.append(agent_id)
        else:
            self.launched.add(agent_id)
            host.adds.append(agent_id)
        handle = AgentHandle(id=agent_id, pid=host.pid, remote=self)
        handle.info["host"] = host.id
        if not self.batching or len(host.adds) >= _ADD_ORDER:
            self.flush()  # in a batch, every _ADD_ORDER agents: the hosts start them while the rest are launched
        return handle

    def flush(self) -> None:
        """Send the queued add orders, one record per host."""
        orders = []
        for host in self.hosts.values():
            if not host.alive:
                continue
            # "fresh": the first launch of each of these ids in the session; the coordinator gives up
            # on a task (a skip list) only when its agent ended, before launching that id again
            for ids, fresh in ((host.adds, True), (host.readds, False)):
                if ids:
                    orders.append(self.ctx.factory.make(host.id, "host", body={"op": "add", "agents": ids, "fresh": fresh}))
            host.adds, host.readds = [], []
        if orders:
            self.ctx.send(orders)
            self.ctx.hook.cfn_flush(ctx=self.ctx, reason="explicit")

    # -------------------------------------------------------------- the handle's remote

    def kill(self, handle, reason: str) -> None:
        """Cancel one hosted agent's task (its host reports the end; the kernel restarts it)."""
        host = self.hosts.get(handle.info.get("host"))
        if host is None or not host.alive or host.pid != handle.pid:
            self.ctx.reap(handle, exit_code=None)  # its host is gone already
            return
        host.kills.setdefault(handle.id, time.monotonic())
        self.ctx.send([self.ctx.factory.make(host.id, "host", body={"op": "kill", "agent": handle.id, "reason": reason})])
        self.ctx.hook.cfn_flush(ctx=self.ctx, reason="explicit")

    def stop(self, handles) -> None:
        """Ask hosted agents to exit: one ``stop_agents`` order per host, not a stop record per agent.

        10,000 stop records (an inbox appended to and rung each) took up to 1 s of a cold
        10,000-agent run on a loaded machine.  What the coordinator sent those agents is written first (the
        flush), so each still reads all of it before it stops, as it would read what came
        before a stop record in its inbox.
        """
        ctx = self.ctx
        ctx.hook.cfn_flush(ctx=ctx, reason="explicit")
        per_host: dict[str, list[str]] = {}
        for handle in handles:
            host = self.hosts.get(handle.info.get("host"))
            if host is None or not host.alive or host.pid != handle.pid:
                ctx.reap(handle, exit_code=None)  # its host is gone already
            else:
                per_host.setdefault(host.id, []).append(handle.id)
        if per_host:
            ctx.send([ctx.factory.make(hid, "host", body={"op": "stop_agents", "agents": ids}) for hid, ids in per_host.items()])
            ctx.hook.cfn_flush(ctx=ctx, reason="explicit")

    # -------------------------------------------------------------- watching

    def tick(self, now: float) -> None:
        self.read_reports()
        live = [h for h in self.hosts.values() if h.alive]
        if not live:
            return
        dead = set(wait_readable([h.pidfd for h in live], 0))
        limit = max(1.0, self.ctx.config.run.shutdown_timeout)
        for host in live:
            if host.pidfd in dead:
                self.host_died(host)
            elif host.kills and now - min(host.kills.values()) > limit:
                log.warning("host %s did not cancel %s within %gs (its event loop is blocked): killing it",
                            host.id, ", ".join(sorted(host.kills)[:5]), limit)
                self.kill_host(host, f"its host {host.id} did not answer a kill within {limit:g}s")

    def read_reports(self) -> None:
        ctx = self.ctx
        if not self.listening:
            return
        messages = ctx.hook.cfn_read(ctx=ctx, agent_id=HOSTS_INBOX)
        for msg in messages:
            body = msg.body if isinstance(msg.body, dict) else {}
            host = self.hosts.get(body.get("host"))
            if host is None or msg.kind != "host":
                ctx.counters["unexpected"] += 1
                continue
            if body.get("op") == "exited" and body.get("pid") == host.pid and isinstance(body.get("agents"), list):
                if isinstance(body.get("counters"), dict):  # the host's own: what its plugins counted for its agents
                    ctx.figures.take_final(host.id, host.pid, body["counters"])
                for entry in body["agents"]:
                    if isinstance(entry, list) and len(entry) == 4:
                        self.agent_ended(host, *entry)
            elif body.get("op") == "lag":
                seconds = body.get("seconds") if isinstance(body.get("seconds"), (int, float)) else None
                host.lags += 1
                host.worst_lag = max(host.worst_lag, seconds or 0.0)
                ctx.counters["host_lags"] += 1
                ctx.events.emit("host_lag", host=host.id, seconds=seconds, agents=body.get("agents"))
        if messages:
            ctx.bus.ack(HOSTS_INBOX, [m.receipt for m in messages])

    def agent_ended(self, host: HostProcess, agent_id: Any, code: Any, why: Any, counters: Any) -> None:
        """A hosted agent's task ended (its host said so): reaped like a process agent that exited.

        ``counters``: its final counters (a process agent leaves them in the shared state)."""
        handle = self.ctx.agents.get(agent_id) if isinstance(agent_id, str) else None
        code = code if isinstance(code, int) else None
        host.kills.pop(agent_id, None)
        if handle is None or not handle.alive or handle.pid != host.pid or handle.info.get("host") != host.id:
            return  # a report about an earlier incarnation
        if code not in (0, None) and not handle.killed_reason and why:
            handle.info["crash"] = str(why)[:500]
        if counters is not None:
            self.ctx.figures.take_final(agent_id, host.pid, counters)
        self.ctx.reap(handle, exit_code=code)

    def host_died(self, host: HostProcess) -> None:
        """A host process ended: its agents ended with it (each is recovered like a process agent)."""
        ctx = self.ctx
        self.read_reports()  # what it reported before it died comes first
        code = host.popen.wait()
        os.close(host.pidfd)
        host.pidfd = None
        victims = [h for h in ctx.agents.values() if h.alive and h.info.get("host") == host.id and h.pid == host.pid]
        ctx.events.emit("host_exited", host=host.id, pid=host.pid, exit_code=code, agents=len(victims))
        host.kills.clear()
        for handle in victims:
            ctx.reap(handle, exit_code=code)  # the kernel relaunches those with work: on a new host

    def kill_host(self, host: HostProcess, reason: str) -> None:
        import signal

        for handle in self.ctx.agents.values():
            if handle.alive and handle.info.get("host") == host.id and handle.pid == host.pid and not handle.killed_reason:
                handle.killed_reason = reason
        host.kills.clear()
        try:
            signal.pidfd_send_signal(host.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -------------------------------------------------------------- the end

    def close(self) -> None:
        """Stop the hosted agents, then their hosts (SIGKILL after ``[run] shutdown_timeout``)."""
        ctx = self.ctx
        hosted = [h.id for h in ctx.agents.values() if h.alive and h.remote is self]
        if hosted:
            ctx.stop_agents(hosted)
        live = [h for h in self.hosts.values() if h.alive]
        if live:
            ctx.send([ctx.factory.make(h.id, "host", body={"op": "stop"}) for h in live])
            ctx.hook.cfn_flush(ctx=ctx, reason="explicit")
        deadline = time.monotonic() + ctx.config.run.shutdown_timeout
        for host in live:
            remaining = max(0.0, deadline - time.monotonic())
            if not wait_readable([host.pidfd], remaining):
                self.kill_host(host, "did not exit in time")
            self.host_died(host)


def manager(ctx, create: bool = False) -> HostManager | None:
    if getattr(ctx, "side", None) != "coordinator":
        return None
    mgr = ctx.state.get(_STATE_KEY)
    if mgr is None and create:
        mgr = ctx.state[_STATE_KEY] = HostManager(ctx)
    return mgr


@hookimpl(tryfirst=True)
def cfn_launch_agent(ctx, agent_id):
    if not is_hosted(ctx.config, agent_id):
        return None
    return manager(ctx, create=True).launch(agent_id)


@hookimpl(tryfirst=True)
def cfn_spawn(ctx, agent_ids):
    hosted = [a for a in agent_ids if is_hosted(ctx.config, a)]
    if not hosted:
        return None
    from .process import interrupts_deferred

    mgr = manager(ctx, create=True)
    mgr.batching = True
    try:
        # one deferral for the batch (a launch is a list append; each launch's own
        # deferral, three signal handlers swapped and put back, was 7% of the coordinator's
        # samples with 10,000 agents); an interrupt is handled after the loop
        with interrupts_deferred():
            for agent_id in hosted:
                handle = ctx.agents.get(agent_id)
                if handle is None or not handle.alive:
                    ctx.launch(agent_id)
    finally:
        mgr.batching = False
        mgr.flush()
    if len(hosted) < len(agent_ids):
        return None  # the process agents: the next cfn_spawn (the baseline skips those launched)
    ctx.wait_ready(hosted, ctx.config.run.spawn_timeout)
    return ctx.spawn_report(agent_ids)


@hookimpl
def cfn_tick(ctx, now):
    mgr = manager(ctx)
    if mgr is not None:
        mgr.tick(now)


@hookimpl
def cfn_session_finish(ctx):
    mgr = manager(ctx)
    if mgr is not None:
        mgr.close()


def hosted_report(ctx) -> dict[str, Any] | None:
    """Figures for the summary: hosts, agents per host, loop lags."""
    mgr = manager(ctx)
    if mgr is None or not mgr.hosts:
        return None
    per_host = {}
    for handle in ctx.agents.values():
        host = handle.info.get("host")
        if host is not None and handle.alive:
            per_host[host] = per_host.get(host, 0) + 1
    return {
        "hosts": len(mgr.hosts),
        "hosts_started": ctx.counters.get("hosts_started", 0),
        "agents_per_host": per_host,
        "loop_lags": sum(h.lags for h in mgr.hosts.values()),
        "worst_lag_seconds": max((h.worst_lag for h in mgr.hosts.values()), default=0.0),
    }
