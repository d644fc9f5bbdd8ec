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


def pid_of(payload):
    """Which process ran the task (recycling tests)."""
    return os.getpid()


_HELD = []


def leaky(payload):
    """Keeps 40 MiB per task for good: a process that grows until it is recycled."""
    _HELD.append(bytearray(40 << 20))
    for i in range(0, len(_HELD[-1]), 4096):  # touched, so it is resident
        _HELD[-1][i] = 1
    return os.getpid()


def silent(payload):
    """A wedged API call: no status, no message, no end."""
    import time

    time.sleep(600)


def reporting(payload, agent):
    """A slow call that says it is alive: never stalled."""
    import time

    for i in range(30):
        agent.status("waiting for the model", step=i)
        time.sleep(0.1)
    return "done"
