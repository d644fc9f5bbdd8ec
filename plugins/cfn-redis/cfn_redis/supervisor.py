"""A `cfn agent` host's agent supervisor: starts, watches and kills agent processes for the coordinator.

The relay of a ``cfn agent`` host (a :class:`cfn_redis.relay.Relay` with
``capacity > 0``) reads launch and kill requests from the host's control
stream; this part of it carries them out.  An agent is forked by the run's fork
server when a plugin offers one (``cfn_agent_forker``, ``relay.forker``), else
started as a fresh interpreter attached to the host's spool; every start and
exit is reported on the run's event stream, which the coordinator's
:class:`cfn_redis.hosts.HostPlacement` follows.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys

from cfn_core import check_agent_id

from . import keys

log = logging.getLogger("cfn.redis")


class _Child:
    """One agent process this host started."""

    __slots__ = ("agent", "token", "popen", "pidfd", "pid")

    def __init__(self, agent, token, popen, pidfd, pid):
        self.agent, self.token, self.popen, self.pidfd, self.pid = agent, token, popen, pidfd, pid


class AgentSupervisor:
    """The agent-launching half of :class:`cfn_redis.relay.Relay` (a mixin).

    Uses the relay's ``children`` (pidfd -> :class:`_Child`), ``capacity``,
    ``forker``, ``sel`` (its selector), ``spool``, ``host_id``, ``run``, ``main``,
    ``events``, ``ctl``, ``stats``, ``mbus`` and its ``_execute`` / ``_expire_once``.
    """

    # ------------------------------------------------------------------ agents of a `cfn agent` host

    def _handle_control(self) -> None:
        done = []
        launches = []
        while self.control:
            eid, fields = self.control.popleft()
            done.append(eid)
            op = fields.get(b"op")
            if op == b"launch":
                launches.append((fields[b"id"].decode(), fields.get(b"token", b"").decode()))
            elif op == b"kill":
                agent, token = fields[b"id"].decode(), fields.get(b"token", b"").decode()
                for child in self.children.values():
                    if child.agent == agent and child.token == token:
                        _kill(child)
        if launches:
            self.sync_state()
            if self.forker is not None:  # pipelined: the forkers work while we register the first ones
                try:
                    self.forker.request([a for a, _ in launches[: max(0, self.capacity - len(self.children))]])
                except Exception as exc:
                    self._forker_failed(exc)
            for agent, token in launches:
                self._launch(agent, token)
            if self.forker is not None and self.forker.outstanding:
                self.forker.cancel_unclaimed()  # forked ahead for a launch that was refused
        if done:
            self._execute([("xack", (self.ctl, keys.GROUP, *done), {}), ("xdel", (self.ctl, *done), {})])

    def _event(self, **fields) -> None:
        fields["host"] = self.host_id
        ops = [("xadd", (self.events, {k: str(v) for k, v in fields.items()}), {})] + self._expire_once(self.events)
        self._execute(ops)

    def sync_state(self) -> None:
        """Copy the run's shared state into the spool (agents read it there at start)."""
        state = self.main.call(lambda r: r.hgetall(keys.run_key(self.run, "state")))
        for key, value in state.items():
            try:
                name = check_agent_id(key.decode())
            except Exception:
                continue
            self.mbus.put_state(name, value)

    def _launch(self, agent: str, token: str) -> None:
        try:
            check_agent_id(agent)
        except Exception as exc:
            self._event(op="exited", id=agent, token=token, code="", reason=str(exc))
            return
        if len(self.children) >= self.capacity:
            self._event(op="exited", id=agent, token=token, code="", reason=f"host {self.host_id} is full ({self.capacity} agents)")
            return
        popen, pid = None, None
        if self.forker is not None:
            try:
                pid = self.forker.take(agent, timeout=30.0)
                self.stats["forked"] += 1
            except Exception as exc:
                self._forker_failed(exc)
        if pid is None:
            cmd = [sys.executable, "-m", "cfn_core.agent", "--run", self.spool, "--id", agent, "--parent", str(os.getpid())]
            try:
                popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), close_fds=True)
            except OSError as exc:
                self._event(op="exited", id=agent, token=token, code="", reason=f"cannot start: {exc}")
                return
            pid = popen.pid
        try:
            pidfd = os.pidfd_open(pid)  # works for the fork server's children too
        except ProcessLookupError:
            code = popen.wait() if popen is not None else self.forker.exit_status(pid)
            self._event(op="exited", id=agent, token=token, code="" if code is None else code, reason="")
            return
        child = _Child(agent, token, popen, pidfd, pid)
        self.children[pidfd] = child
        self.sel.register(pidfd, selectors.EVENT_READ, child)
        self.stats["launched"] += 1
        self._event(op="started", id=agent, token=token, pid=pid)

    def _forker_failed(self, exc) -> None:
        log.warning("the fork server failed (%s); starting agents as fresh interpreters", exc)
        try:
            self.forker.close(1.0)
        except Exception:
            pass
        self.forker = None

    def _child_exited(self, child: _Child, report: bool = True) -> None:
        if self.children.pop(child.pidfd, None) is None:
            return
        try:
            self.sel.unregister(child.pidfd)
        except (KeyError, ValueError):
            pass
        os.close(child.pidfd)
        if child.popen is not None:
            code = child.popen.wait()
        else:
            code = self.forker.exit_status(child.pid) if self.forker is not None else None
        if report:
            try:
                self._event(op="exited", id=child.agent, token=child.token, code="" if code is None else code, reason="")
            except Exception:
                pass



def _kill(child: _Child) -> None:
    try:
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    except (ProcessLookupError, OSError):
        pass

