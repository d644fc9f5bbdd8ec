"""Python handlers for tests/test_llm_*.py: an LLM API client's failure modes, without a network."""

import os

from cfn_core import RateLimited


def rate_limited_once(payload, agent):
    """The first call of each task is refused with a Retry-After; the second answers and reports its usage."""
    marker = os.path.join(payload["dir"], f"seen-{payload['n']}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RateLimited("429 from the API", retry_after=0.05)
    agent.usage(tokens_in=100, tokens_out=20, cost_usd=0.25)
    agent.usage(tokens_in=1, cost_usd=0.25, turns=1)
    return payload["n"]
