"""Handlers for the hosted-agent tests (tests/test_hosted*.py): async and sync, talking, failing.

Agents import this module by name (``hosted_handlers:echo``): the tests set ``[workload]
directory`` to this directory.
"""

from __future__ import annotations

import asyncio
import os
import time


async def echo(payload, agent):
    """An async handler: returns who ran it, where."""
    await asyncio.sleep(0)
    return {"payload": payload, "id": agent.id, "pid": os.getpid()}


def sync_echo(payload, agent):
    """A sync handler: runs in the host's thread pool; agent calls hop onto the loop."""
    return {"payload": payload, "id": agent.id, "pid": os.getpid(), "peers": len(agent.peers())}


async def fails_on_odd(payload, agent):
    if isinstance(payload, int) and payload % 2:
        raise ValueError(f"odd payload {payload}")
    return payload


class Talker:
    """A class agent: a task asks a peer (a request), the peer answers in on_message."""

    async def on_task(self, payload, agent):
        op = payload.get("op") if isinstance(payload, dict) else None
        if op == "ask":
            answer = await agent.request(payload["to"], {"q": payload.get("q")}, timeout=60)
            return {"answer": answer, "by": agent.id}
        if op == "sleep_then_message":  # a fake LLM call, then a message to a peer
            await asyncio.sleep(payload.get("seconds", 1.0))
            agent.send(payload["to"], {"from": agent.id})
            return "sent"
        if op == "gather":
            got = []
            while len(got) < payload["n"]:
                m = await agent.receive(timeout=60)
                got.append([m.sender, m.body])
            return got
        if op == "burst":
            for i in range(payload["n"]):
                agent.send(payload["to"], i)
            return payload["n"]
        if op == "block":  # a handler that blocks the event loop (what the docs forbid)
            time.sleep(payload.get("seconds", 0.5))
            return "blocked"
        if op == "hang":  # never finishes: the task timeout cancels it
            marker = payload.get("marker")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                await asyncio.sleep(3600)
            return "second attempt"
        if op == "die_once":  # the host is SIGKILLed by the test while this task runs
            marker = payload.get("marker")
            if marker and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                await asyncio.sleep(3600)
            log_run(payload)
            return {"pid": os.getpid()}
        return payload

    async def on_message(self, message, agent):
        if message.wants_reply:
            agent.reply(message, {"echo": message.body, "by": agent.id, "pid": os.getpid()})


class SyncTalker:
    """The same flows for a process agent (a sync class agent)."""

    def on_task(self, payload, agent):
        op = payload.get("op") if isinstance(payload, dict) else None
        if op == "ask":
            answer = agent.request(payload["to"], {"q": payload.get("q")}, timeout=60)
            return {"answer": answer, "by": agent.id}
        if op == "gather":
            got = []
            while len(got) < payload["n"]:
                m = agent.receive(timeout=60)
                got.append([m.sender, m.body])
            return got
        if op == "burst":
            for i in range(payload["n"]):
                agent.send(payload["to"], i)
            return payload["n"]
        return payload

    def on_message(self, message, agent):
        if message.wants_reply:
            agent.reply(message, {"echo": message.body, "by": agent.id, "pid": os.getpid()})


def log_run(payload):
    """Append a line per completed run of a task (the exactly-once check counts them)."""
    with open(payload["log"], "a") as f:
        f.write(f"{payload['task']} {os.getpid()}\n")


class CountsMessages:
    """A task sends ``n`` messages to ``to``; on_stop writes how many this agent received
    to ``$CFN_HOSTED_DIR/<id>`` (what it read before it stopped)."""

    def __init__(self):
        self.got = 0

    async def on_task(self, payload, agent):
        for i in range(payload["n"]):
            agent.send(payload["to"], i)
        return payload["n"]

    def on_message(self, message, agent):
        self.got += 1

    def on_stop(self, agent):
        with open(os.path.join(os.environ["CFN_HOSTED_DIR"], agent.id), "w") as f:
            f.write(str(self.got))
