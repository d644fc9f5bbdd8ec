"""The handler of examples/feed-stream: score one sentence."""

import os


def score(payload):
    """``{"id": n, "text": str}`` -> the number of distinct words, and who scored it."""
    words = payload["text"].lower().split()
    return {"id": payload["id"], "words": len(words), "distinct": len(set(words)), "pid": os.getpid()}
