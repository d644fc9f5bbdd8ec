"""Word count as cfn agents that talk: map in every agent, shuffle by key with ``agent.send``.

Every agent gets one document (its task payload, with the number of reducers) and
counts its words (map).  The run's first ``reducers`` agents (in the order of
``agent.peers()``, the run's directory) are the reducers, and each word belongs to
exactly one of them, by a stable hash of the word.  Every agent sends each reducer
the counts of the words it owns (shuffle: ``agent.send(reducer, part, kind="counts")``,
one message per reducer, empty parts too, so that a reducer knows how many to wait
for).  A reducer receives one message from every other agent (``agent.receive(kind=
"counts")``) and adds them up (reduce): the total of each of its words, complete.

``run.py`` adds up the reducers' totals and compares them with the corpus' own counts;
a lost or duplicated message would make that check fail.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from typing import Any

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
    """The class agent: ``handler = "wordcount:WordCount"`` in cfn.toml (one instance per agent)."""

    def on_task(self, task: dict[str, Any], agent) -> dict[str, Any]:
        """Map ``task["document"]``, send every reducer its part, and reduce if this agent is one."""
        everyone = sorted(agent.peers() + [agent.id])
        reducers = everyone[: max(1, min(task["reducers"], len(everyone)))]
        parts: list[dict[str, int]] = [{} for _ in reducers]
        for word, n in Counter(words(task["document"])).items():
            parts[partition(word, len(reducers))][word] = n
        sent = 0
        for reducer, part in zip(reducers, parts):
            if reducer != agent.id:  # its own part it keeps
                agent.send(reducer, part, kind="counts")
                sent += 1
        if agent.id not in reducers:
            return {"counts": {}, "sent": sent, "received": 0}
        total = Counter(parts[reducers.index(agent.id)])
        for _ in range(len(everyone) - 1):  # one message from every other agent
            total.update(agent.receive(timeout=task.get("timeout", 60.0), kind="counts").body)
        return {"counts": dict(total), "sent": sent, "received": len(everyone) - 1}
