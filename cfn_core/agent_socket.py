"""Command agents that talk: the agent serves ``$CFN_AGENT_SOCKET`` while its command runs.

``cfn msg ...`` (:mod:`cfn_core.msg`) is a client of that unix stream socket: one JSON
request line, one JSON response line.  The agent stays the single reader of its inbox,
so every guarantee of the Python API (docs/RELIABILITY.md) holds for shell agents too.
The command handler is a select loop over the command's pipes, the socket's listener and
connections, and the bus doorbell: the agent keeps reading its inbox while the command
runs, and a ``recv --wait`` or a ``request`` waits there without blocking the loop.

Requests (``op`` and its fields) and what the response holds besides ``ok``:

* ``send {to, body, kind}`` -> ``id``
* ``recv {wait, sender, kind}`` -> ``message`` (``AgentMessage.to_dict()``), or code 1
* ``request {to, body, timeout}`` -> ``body`` of the reply, or code 1 (timeout, peer gone)
* ``reply {id, body}`` -> ``id``
* ``peers {role}`` -> ``peers``
* ``status {text}``

A failure is ``{"ok": false, "code": 1 or 2, "error": one line}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import time
from typing import TYPE_CHECKING, Any

from .agent_api import AgentMessage
from .errors import CfnError, PeerGone

if TYPE_CHECKING:
    from .agent_api import Talk

#: a request line longer than this is refused (the bus limits messages anyway)
_MAX_REQUEST = 64 * 1024 * 1024
_PEER_CHECK_SECONDS = 0.5


def socket_path(run_dir: str, agent_id: str) -> str:
    """Where ``agent_id``'s socket goes: in the (private) run directory, short enough for AF_UNIX."""
    name = agent_id if len(agent_id) <= 40 else hashlib.sha256(agent_id.encode()).hexdigest()[:32]
    return os.path.join(run_dir, "talk", f"{name}.sock")


class AgentSocket:
    """The listening socket of one agent and the requests in progress on it."""

    def __init__(self, talk: "Talk", path: str):
        self.talk = talk
        self.path = path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)  # a dead predecessor's
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.buffers: dict[socket.socket, bytearray] = {}
        self.waiting: list[dict] = []  # blocking requests: recv --wait, request
        self.received: dict[str, AgentMessage] = {}  # by id, for `cfn msg reply`

    def close(self) -> None:
        for conn in list(self.buffers):
            conn.close()
        self.buffers.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -------------------------------------------------------------- the select loop's side

    def register(self, sel: selectors.BaseSelector) -> None:
        sel.register(self.listener, selectors.EVENT_READ, ("listen", None))

    def on_event(self, sel: selectors.BaseSelector, what: str, conn: socket.socket | None) -> None:
        if what == "listen":
            try:
                new, _ = self.listener.accept()
            except BlockingIOError:
                return
            new.setblocking(False)
            self.buffers[new] = bytearray()
            sel.register(new, selectors.EVENT_READ, ("conn", new))
            return
        buf = self.buffers.get(conn)
        if buf is None:
            return
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, conn)
            return
        buf += data
        if len(buf) > _MAX_REQUEST:
            self._answer(sel, conn, {"ok": False, "code": 2, "error": "request too large"})
            return
        if b"\n" in buf:
            line = bytes(buf[: buf.index(b"\n")])
            sel.unregister(conn)  # one request per connection
            self._serve(sel, conn, line)

    def poll(self, sel: selectors.BaseSelector) -> float | None:
        """Answer the waiting requests that can be; the seconds until the next deadline (or None)."""
        now = time.monotonic()
        next_due = None
        still = []
        for w in self.waiting:
            try:
                done = self._try_waiting(sel, w, now)
            except CfnError as exc:
                self._answer(sel, w["conn"], {"ok": False, "code": 1, "error": str(exc)})
                done = True
            if not done:
                still.append(w)
                due = min(w["deadline"], w.get("check_at", w["deadline"])) - now
                next_due = due if next_due is None else min(next_due, due)
        self.waiting = still
        return None if next_due is None else max(next_due, 0.0)

    # -------------------------------------------------------------- requests

    def _serve(self, sel, conn, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("not a request object")
        except ValueError as exc:
            self._answer(sel, conn, {"ok": False, "code": 2, "error": f"bad request: {exc}"})
            return
        agent = self.talk.agent
        op = req["op"]
        try:
            if op == "send":
                self._answer(sel, conn, {"ok": True, "id": agent.send(req.get("to"), req.get("body"), req.get("kind") or "msg")})
            elif op == "reply":
                original = self.received.get(req.get("id"))
                if original is None:
                    raise CfnError(f"no message {req.get('id')!r:.100} was received by this agent (cfn msg recv shows ids)")
                self._answer(sel, conn, {"ok": True, "id": agent.reply(original, req.get("body"))})
            elif op == "peers":
                self._answer(sel, conn, {"ok": True, "peers": agent.peers(req.get("role"))})
            elif op == "status":
                agent.status(str(req.get("text", "")))
                self._answer(sel, conn, {"ok": True})
            elif op == "recv":
                wait = float(req.get("wait") or 0.0)
                self.waiting.append({"conn": conn, "op": "recv", "kind": req.get("kind"), "sender": req.get("sender"),
                                     "reply_to": None, "deadline": time.monotonic() + max(wait, 0.0)})
            elif op == "request":
                timeout = float(req.get("timeout") or 0.0)
                dst = self.talk.resolve(req.get("to"))
                msg_id = self.talk.send_many([dst], req.get("body"), "request", rq=True)[0]
                now = time.monotonic()
                self.waiting.append({"conn": conn, "op": "request", "kind": None, "sender": dst, "reply_to": msg_id,
                                     "deadline": now + timeout, "check_at": now + _PEER_CHECK_SECONDS, "id": msg_id})
            else:
                self._answer(sel, conn, {"ok": False, "code": 2, "error": f"unknown op {op!r:.40}"})
        except CfnError as exc:
            self._answer(sel, conn, {"ok": False, "code": 2, "error": str(exc)})
        except (TypeError, ValueError) as exc:
            self._answer(sel, conn, {"ok": False, "code": 2, "error": f"bad request: {exc}"})

    def _try_waiting(self, sel, w: dict, now: float) -> bool:
        talk = self.talk
        found = talk.take(w["kind"], w["sender"], w["reply_to"])
        if found is not None:
            if w["op"] == "recv":
                self.received[found.id] = found
                if len(self.received) > 10_000:
                    self.received.pop(next(iter(self.received)))
                self._answer(sel, w["conn"], {"ok": True, "message": found.to_dict()})
            else:
                self._answer(sel, w["conn"], {"ok": True, "body": found.body})
            return True
        if w["op"] == "request" and now >= w["check_at"]:
            w["check_at"] = now + _PEER_CHECK_SECONDS
            if w["sender"] not in talk.known(refresh=True):
                raise PeerGone(f"{w['sender']} left the run before it replied to request {w['id']}")
        if now >= w["deadline"]:
            if w["op"] == "recv":
                error = "no message"
            else:
                error = f"no reply from {w['sender']} to request {w['id']}"
            self._answer(sel, w["conn"], {"ok": False, "code": 1, "error": error})
            return True
        return False

    def _answer(self, sel, conn: socket.socket, response: dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(5.0)
            conn.sendall(json.dumps(response).encode() + b"\n")
        except OSError:
            pass  # the client went away (killed, timed out): nothing to tell it
        self._drop(sel, conn)

    def _drop(self, sel, conn: socket.socket) -> None:
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.buffers.pop(conn, None)
        self.waiting = [w for w in self.waiting if w["conn"] is not conn]
        conn.close()
