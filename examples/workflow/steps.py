"""The steps of examples/workflow: split a text, count each half's words, add the counts.

A task with ``needs`` gets ``{"payload": <its payload>, "after": {task id: result}}``.
"""

from collections import Counter


def run(payload):
    after = payload.get("after", {}) if "after" in payload else {}
    step = (payload.get("payload") or {}).get("step") if "after" in payload else payload.get("step")
    if step == "split":
        words = payload["text"].split()
        return [words[: len(words) // 2], words[len(words) // 2 :]]
    if step == "count":
        (halves,) = after.values()
        return dict(Counter(halves[payload["payload"]["half"]]))
    if step == "total":
        total = Counter()
        for counts in after.values():
            total.update(counts)
        return {"words": sum(total.values()), "most_common": total.most_common(2)}
    raise ValueError(f"unknown step {step!r}")
