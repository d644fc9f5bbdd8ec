"""The example's hosted agent: call the LLM, pass the summary on, wait for the neighbour's, report."""

from __future__ import annotations

from llm import FakeLLM

_llm = FakeLLM()  # one client per host process, shared by its thousands of agents (as an HTTP client would be)


async def research(payload, agent):
    summary = await _llm.complete(f"research topic {payload['topic']}")
    agent.send(payload["next"], {"summary": summary, "topic": payload["topic"]})
    agent.status("waiting for a neighbour", topic=payload["topic"])
    message = await agent.receive(timeout=60, sender=payload["previous"])
    return {"mine": summary, "neighbour": message.body["topic"], "by": agent.id}
