"""Word count as a cfn mesh handler: map in each agent, shuffle by key over peer messages.

Each agent gets one document (its task payload) and counts its words (map).  The
coordinator gives every agent ``messages_per_agent`` peers, chosen at random from
``[workload] seed``; ``scatter`` splits the agent's counts into one part per peer
by a stable hash of the word (shuffle), and each part travels to its peer in a
peer message.  Once an agent has received every peer message meant for it,
``gather`` adds up the parts it received (reduce) and that sum is its result.

The peers are a random plan, not a fixed partition of the key space: the same
word can be sent to different agents by different senders, so one word's count
may end up split over several agents.  Nothing is counted twice and nothing is
lost, so the sum of all agents' results equals the corpus' counts: that is what
``run.py`` checks.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter

_WORD = re.compile(r"[a-z0-9']+")

VOCABULARY = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "agent message bus queue shard batch pool spawn inbox peer round task result coordinator"
).split()


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def generate_corpus(documents: int, words_per_document: int = 300, seed: int = 0) -> list[str]:
    """Deterministic documents whose word frequencies follow Zipf's law (as real text does)."""
    rng = random.Random(seed)
    vocab = VOCABULARY + [f"w{i:04d}" for i in range(2000)]
    weights = [1.0 / rank for rank in range(1, len(vocab) + 1)]
    return [" ".join(rng.choices(vocab, weights, k=words_per_document)) for _ in range(documents)]


def partition(word: str, parts: int) -> int:
    """Which part a word goes to: a hash that is the same in every process (unlike hash())."""
    return zlib.crc32(word.encode()) % parts


class WordCount:
    """The handler object: ``handler = "wordcount:wordcount"`` in cfn.toml."""

    def __call__(self, document: str) -> dict[str, int]:
        # star topology (no peers): a plain word count of the document
        return dict(Counter(words(document)))

    def scatter(self, document: str, peers: list[str]) -> list[dict[str, int]]:
        counts = Counter(words(document))
        parts: list[dict[str, int]] = [{} for _ in peers]
        for word, n in counts.items():
            parts[partition(word, len(peers))][word] = n
        return parts

    def gather(self, document: str, bodies: list) -> dict[str, int]:
        total: Counter = Counter()
        for part in bodies:
            if isinstance(part, dict):
                total.update(part)
        return dict(total)


wordcount = WordCount()
