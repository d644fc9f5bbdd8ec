"""The bash bus's acceptance flows on cfn's agent API (run them with ``python flows.py``).

``Talker`` is a class agent: one instance per agent process.  A task drives one flow
from the agent that got it; the other agents answer in ``on_message`` while idle.
"""


class Talker:
    def __init__(self):
        self.received = {}  # key -> bodies, in the order they arrived

    def on_message(self, message, agent):
        body = message.body
        if message.wants_reply and isinstance(body, dict) and "relay" in body:
            hops = body["relay"]
            if hops:  # pass it on, answer with the whole chain
                chain = agent.request(hops[0], {"relay": hops[1:], "chain": body["chain"] + [agent.id]}, timeout=60)
            else:
                chain = body["chain"] + [agent.id]
            agent.reply(message, chain)
        elif message.wants_reply and isinstance(body, dict) and "report" in body:
            agent.reply(message, self.received.get(body["report"], []))
        elif message.wants_reply:
            agent.reply(message, f"pong from {agent.id}")
        else:
            self.received.setdefault(body["key"], []).append(body["n"])

    def on_task(self, flow, agent):
        peers = agent.peers()
        if flow == "round trip":
            return agent.request(peers[0], "ping", timeout=60)
        if flow == "five status updates":
            for n in range(1, 6):
                agent.send(peers[0], {"key": "status", "n": n}, kind="status")
                agent.status(f"update {n}")  # to the coordinator too
            return agent.request(peers[0], {"report": "status"}, timeout=60)
        if flow == "relay":
            return agent.request(peers[0], {"relay": [peers[1]], "chain": [agent.id]}, timeout=60)
        if flow.startswith("sender "):  # three of these run at once, each sends 10 to the last agent
            receiver = max(peers + [agent.id])
            for n in range(10):
                agent.send(receiver, {"key": flow, "n": n})
            return agent.request(receiver, {"report": flow}, timeout=60)
        raise ValueError(f"unknown flow {flow!r}")
