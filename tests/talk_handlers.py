"""Agents for the "agents that talk" tests (tests/test_talk_*.py).

Agents import this module by name (``talk_handlers:Flow``): the tests set ``[workload]
directory`` to this directory.  ``Flow`` is a class agent: a task (the payload's ``op``)
drives one flow from one agent, the other agents answer in ``on_message`` while idle,
so no flow depends on which agent the coordinator gives the task to.
"""

from __future__ import annotations

import os
import signal
import time

from cfn_core import InboxFull, MessageTooLarge, NotJSON, PeerGone, ReceiveTimeout, RequestTimeout, UnknownAgent


def with_agent(payload, agent):
    """A function handler that takes the agent (detected from its signature)."""
    return {"id": agent.id, "role": agent.role, "peers": agent.peers(), "payload": payload}


def waits_then_echoes(payload):
    """Task "wait" blocks in receive for a message that never comes; others echo."""
    return payload


def receive_briefly(payload, agent):
    if payload == "wait":
        try:
            agent.receive(timeout=1.0)
        except ReceiveTimeout as exc:
            return f"timed out: {exc}"
        return "received?"
    return payload


def _mark(name: str) -> None:
    directory = os.environ.get("CFN_TALK_DIR")
    if directory:
        with open(os.path.join(directory, name), "a") as f:
            f.write(f"{os.getpid()}\n")


def _first_time(name: str) -> bool:
    """True once per test (a marker file in $CFN_TALK_DIR): the first attempt of a task."""
    path = os.path.join(os.environ["CFN_TALK_DIR"], name)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _heartbeat_receive(agent, kind: str, total: float = 60.0):
    """receive() with a status now and then: the coordinator's watchdog sees this agent alive."""
    deadline = time.monotonic() + total
    while time.monotonic() < deadline:
        try:
            return agent.receive(timeout=0.5, kind=kind)
        except ReceiveTimeout:
            agent.status("waiting", kind=kind)
    raise AssertionError(f"no {kind} message within {total}s")


class Flow:
    """One instance per agent process: its state (``self.seen``) lasts across tasks and messages."""

    def __init__(self):
        self.tasks = 0
        self.seen: dict[str, list] = {}  # key -> bodies, in the order on_message got them
        self.order: list[str] = []

    def on_start(self, agent):
        self.started_as = agent.id

    def on_stop(self, agent):
        _mark(f"on_stop-{agent.id}")

    # ------------------------------------------------------------------ answering side

    def on_message(self, message, agent):
        body = message.body
        kind = message.kind
        if kind == "boom":
            raise RuntimeError("on_message exploded on purpose")
        if kind == "pause":  # block in receive: everything else queues, unsettled (backpressure)
            try:
                agent.receive(kind="resume", timeout=body["seconds"])
            except ReceiveTimeout:
                pass
            return
        if kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "slow":  # busy while the coordinator asks every agent to stop
            try:
                agent.receive(kind="never", timeout=body["seconds"])
            except ReceiveTimeout:
                pass
            _mark(f"slow_done-{agent.id}")
            return
        if kind == "x":
            self.order.append(body)
            if body == "x1":  # wait for the "y" sent after "x2": "x2" must stay queued meanwhile
                y = agent.receive(kind="y", timeout=60)
                self.order.append(y.body)
            return
        if kind == "flood":  # send to body["to"] until its inbox stays full; report to the asker
            t0 = time.monotonic()
            for i in range(1000):
                try:
                    agent.send(body["to"], i, kind="item")
                except InboxFull as exc:
                    agent.send(message.sender, {"sent": i, "error": str(exc), "waited": time.monotonic() - t0},
                               kind="flood-report")
                    return
            agent.send(message.sender, {"sent": 1000, "error": None}, kind="flood-report")
            return
        if kind == "request":
            if isinstance(body, dict) and body.get("relay"):  # A -> B -> C: forward, answer with the chain
                rest = body["relay"]
                chain = agent.request(rest[0], {"relay": rest[1:], "chain": body["chain"] + [agent.id]}, timeout=60)
                agent.reply(message, chain)
            elif isinstance(body, dict) and "chain" in body:
                agent.reply(message, body["chain"] + [agent.id])
            elif isinstance(body, dict) and body.get("report"):
                agent.reply(message, self.seen.get(body["report"], []) if body["report"] != "order" else self.order)
            else:
                agent.reply(message, {"echo": body, "by": agent.id})
            return
        key = message.topic or (body.get("key") if isinstance(body, dict) else kind)
        self.seen.setdefault(key, []).append(body.get("seq") if isinstance(body, dict) else body)

    # ------------------------------------------------------------------ driving side

    def on_task(self, payload, agent):
        self.tasks += 1
        op = payload.get("op") if isinstance(payload, dict) else None
        others = agent.peers()
        if op is None:
            return {"tasks": self.tasks, "started_as": self.started_as}
        if op == "roundtrip":
            return agent.request(others[0], {"q": "ping"}, timeout=60)
        if op == "five_status":
            to = others[0]
            for i in range(1, 6):
                agent.send(to, {"key": "status", "seq": i}, kind="status")
                agent.status(f"step {i}", step=i)
            return agent.request(to, {"report": "status"}, timeout=60)
        if op == "relay":
            a, b, c = agent.id, others[0], others[1]
            return agent.request(b, {"relay": [c], "chain": [a]}, timeout=60)
        if op == "senders":  # one of several concurrent senders to the last agent of the run
            to = max(others + [agent.id])
            key = f"from-{payload['n']}"
            for seq in range(payload["count"]):
                agent.send(to, {"key": key, "seq": seq})
            # per-sender FIFO: this request arrives after the messages above, so the answer has them all
            return agent.request(to, {"report": key}, timeout=60)
        if op == "role_picks":  # which agents of a role this task's sends to the role would reach
            picks = [agent._talk.resolve("worker") for _ in range(payload.get("count", 4))]
            _mark(f"picks-{payload['key']}-" + "-".join(picks))
            if payload.get("die_once") and not os.path.exists(os.path.join(os.environ["CFN_TALK_DIR"], "died")):
                _mark("died")
                os.kill(os.getpid(), signal.SIGKILL)  # the replacement runs the task again
            return picks
        if op == "unknown":
            try:
                agent.send("agent-9999", "hello")
            except UnknownAgent as exc:
                return str(exc)
            return "sent?"
        if op == "unknown_role":
            try:
                agent.broadcast("hello", role="reviewer")
            except UnknownAgent as exc:
                return str(exc)
            return "sent?"
        if op == "too_large":
            try:
                agent.send(others[0], "x" * payload["size"])
            except MessageTooLarge as exc:
                return str(exc)
            return "sent?"
        if op == "not_json":
            try:
                agent.send(others[0], {"a": {1, 2}})
            except NotJSON as exc:
                return f"{type(exc).__name__}: {exc}"
            return "sent?"
        if op == "request_timeout":
            to = others[0]
            agent.send(to, {"seconds": payload["pause"]}, kind="pause")  # it answers nothing meanwhile
            t0 = time.monotonic()
            try:
                agent.request(to, {"q": "anyone?"}, timeout=payload["timeout"])
            except RequestTimeout as exc:
                return {"error": str(exc), "waited": time.monotonic() - t0}
            return "answered?"
        if op == "peer_gone":
            to = others[0]
            agent.send(to, None, kind="die")
            try:
                agent.request(to, {"q": "are you there?"}, timeout=120)
            except PeerGone as exc:
                return f"PeerGone: {exc}"
            return "answered?"
        if op == "boom":
            to = others[0]
            agent.send(to, None, kind="boom")
            return agent.request(to, {"q": "still alive?"}, timeout=60)
        if op == "queued_kinds":
            to = others[0]
            agent.send(to, "x1", kind="x")
            agent.send(to, "x2", kind="x")
            agent.send(to, "y", kind="y")
            return agent.request(to, {"report": "order"}, timeout=60)
        if op == "inbox_full":
            slow, flooder = others[0], others[1]
            agent.send(slow, {"seconds": payload["pause"]}, kind="pause")
            agent.send(flooder, {"to": slow}, kind="flood")
            return _heartbeat_receive(agent, "flood-report").body
        if op == "slow_then_stop":
            agent.send(others[0], {"seconds": payload["seconds"]}, kind="slow")
            return "sent"
        if op == "publish":
            agent.publish("news", "hello")
            return [agent.request(p, {"report": "news"}, timeout=60) for p in others]
        if op == "subscribe":
            agent.subscribe(payload["topic"])
            return "subscribed"
        raise ValueError(f"unknown op {op!r}")


class Sender:
    """Kill tests: a task sends to the other agent, then its first attempt is SIGKILLed."""

    def __init__(self):
        self.seen: list = []

    def on_message(self, message, agent):
        if message.kind == "request":
            agent.reply(message, self.seen)
        else:
            self.seen.append([message.id, message.body])

    def on_task(self, payload, agent):
        other = agent.peers()[0]
        if payload == "send_then_die":
            for i in range(5):
                agent.send(other, i)
            if _first_time("sender-died"):
                os.kill(os.getpid(), signal.SIGKILL)  # the retried task re-sends the same ids
            return agent.request(other, "report", timeout=60)
        if payload == "receive_then_die":
            got = [agent.receive(timeout=60).body for _ in range(3)]
            if _first_time("receiver-died"):
                os.kill(os.getpid(), signal.SIGKILL)  # nothing settled: the replacement re-reads them
            return got
        if payload == "send_three":
            for i in range(3):
                agent.send(other, f"m{i}")
            return "sent"
        raise ValueError(payload)
