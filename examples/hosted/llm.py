"""A fake async LLM client: the latency of a real API call, no network (for the example and its test)."""

from __future__ import annotations

import asyncio
import random


class FakeLLM:
    """``await FakeLLM().complete(prompt)`` -> a short "completion" after 0.5-1.5 s (seeded by the prompt)."""

    def __init__(self, min_latency: float = 0.5, max_latency: float = 1.5):
        self.min_latency = min_latency
        self.max_latency = max_latency
        self.calls = 0

    async def complete(self, prompt: str) -> str:
        self.calls += 1
        rng = random.Random(prompt)
        await asyncio.sleep(rng.uniform(self.min_latency, self.max_latency))  # awaiting: the host runs the others meanwhile
        words = prompt.split()
        return f"summary of {words[-1] if words else 'nothing'} ({len(prompt)} chars)"
