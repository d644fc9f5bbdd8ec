"""The Python roles of examples/roles: the planner splits a job, a reviewer judges a coder's work."""

from __future__ import annotations


def plan(job):
    """Split ``{"job": text, "parts": n}`` (or a bare string) into ``n`` specs of consecutive words."""
    text, parts = (job.get("job", ""), job.get("parts", 4)) if isinstance(job, dict) else (str(job), 4)
    words = text.split() or ["nothing"]
    parts = max(1, min(parts, len(words)))
    size = -(-len(words) // parts)  # ceiling: every part gets a share, the last one the rest
    return [{"part": i, "spec": " ".join(words[i * size : (i + 1) * size])} for i in range(parts) if words[i * size :]]


def review(work):
    """Approve a coder's output unless it still says TODO."""
    work = work if isinstance(work, str) else str(work)
    return {"verdict": "revise" if "TODO" in work else "approve", "lines": len(work.splitlines())}
