"""Where an inbox lives: the shard of an agent id, computed by every process alike.

Layout on the shm bus (relative to the run directory)::

    shard-<k>/<agent_id>        agent inboxes, k = shard_of(agent_id)
    shard-<k>/_coordinator      the coordinator's inbox, split: agents of shard k write here
    shard-fallback/<agent_id>   used by a sender that finds shard-<k> unusable

Strategies (``[shard] strategy``), all computed from the id alone:

``hash``
    Multiplicative (Fibonacci) hashing.  An id ending in a number
    (``agent-0042``) maps to ``H(prefix) + n * 2^64/phi (mod 2^64)``: consecutive
    numbers land far apart, yet ``n = 1..N`` fill the shards evenly (within a
    few ids, by the three-gap theorem), which a plain digest does not (500 ids in
    8 shards: blake2b gives max/mean 1.31, this 1.008).  Other ids use
    ``blake2b(id)``.  Never a sum of character codes (anagrams and neighbours
    cluster).
``round-robin``
    ``(n - 1) mod count`` for an id ending in number ``n``: agent-0001 in shard
    0, agent-0002 in shard 1, ...; ``hash`` for other ids.
``random``
    ``random.Random("<seed>:<id>")`` with ``[workload] seed``: a different
    layout per seed, the same in every process of a run.
"""

from __future__ import annotations

import hashlib
import random

STRATEGIES = ("hash", "round-robin", "random")
FALLBACK_DIR = "shard-fallback"

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi
_MASK = (1 << 64) - 1
#: digests of id prefixes seen (``agent-``, a role's), kept up to this many
_PREFIX_CACHE_MAX = 1024
_prefix_digests: dict[str, int] = {}


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_number(agent_id: str) -> tuple[str, int] | None:
    """``(prefix, n)`` of an id ending in decimal digits (``agent-0042``: ``("agent-", 42)``), else None.

    String methods, not a regular expression: every forked agent routes with this, and a
    pattern's first match in a fresh fork copies ~20 pages of the zygote (measured).
    """
    i = end = len(agent_id)
    while i and agent_id[i - 1].isdecimal():  # what the pattern \d matches
        i -= 1
    return None if i == end else (agent_id[:i], int(agent_id[i:]))


def hash_shard(agent_id: str, count: int) -> int:
    """Shard of ``agent_id`` under the ``hash`` strategy."""
    numbered = split_number(agent_id)
    if numbered:
        prefix, n = numbered
        base = _prefix_digests.get(prefix)
        if base is None:
            base = _digest64(prefix)
            if len(_prefix_digests) < _PREFIX_CACHE_MAX:
                _prefix_digests[prefix] = base
        h = (base + n * _GOLDEN) & _MASK
    else:
        h = _digest64(agent_id)
    return (h * count) >> 64


def shard_of(agent_id: str, count: int, strategy: str, seed: int = 0) -> int:
    """The shard (0 .. count-1) of ``agent_id``.  Pure: every process gets the same answer."""
    if count <= 1:
        return 0
    if strategy == "hash":
        return hash_shard(agent_id, count)
    if strategy == "round-robin":
        numbered = split_number(agent_id)
        return (numbered[1] - 1) % count if numbered else hash_shard(agent_id, count)
    if strategy == "random":
        return random.Random(f"{seed}:{agent_id}").randrange(count)
    raise ValueError(f"unknown shard strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def shard_dir(k: int) -> str:
    return f"shard-{k}"


def location(agent_id: str, k: int) -> str:
    return f"{shard_dir(k)}/{agent_id}"


def fallback_location(agent_id: str) -> str:
    return f"{FALLBACK_DIR}/{agent_id}"


def balance(counts: list[int]) -> float | None:
    """max / mean of per-shard counts (1.0 is perfect); None without data."""
    total = sum(counts)
    if not counts or not total:
        return None
    return max(counts) / (total / len(counts))
