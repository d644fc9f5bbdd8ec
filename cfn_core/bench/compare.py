"""The regression gate: a new report against an old one.

A cell (same id: combination, N, workload) regresses when its p50 is more than
``[bench] regression`` (default 10%) above the old p50, or when its delivery is
under ``[bench] min_delivery``, or when it failed to run where it ran before.
"""

from __future__ import annotations

from .render import fmt_pct, fmt_s


def compare(new: dict, old: dict, *, regression: float, min_delivery: float) -> dict:
    """``{"regressions": [...], "compared": n, "new_cells": [...], "missing": [...], "notes": [...]}``."""
    old_cells = {c["id"]: c for c in old["cells"]}
    out = {"regressions": [], "compared": 0, "new_cells": [], "missing": [], "notes": []}
    if old.get("machine", {}).get("cores") != new.get("machine", {}).get("cores"):
        out["notes"].append(
            f"the old report comes from a machine with {old.get('machine', {}).get('cores')} cores, "
            f"this one has {new.get('machine', {}).get('cores')}"
        )
    if old.get("runner", {}).get("mode") != new.get("runner", {}).get("mode"):
        out["notes"].append(f"the old report ran {old.get('runner', {}).get('mode')}, this one {new.get('runner', {}).get('mode')}")
    seen = set()
    for c in new["cells"]:
        seen.add(c["id"])
        rate = c.get("delivery_rate")
        if rate is not None and rate < min_delivery:
            out["regressions"].append(
                {"id": c["id"], "why": f"delivery {fmt_pct(rate)} is below the floor {min_delivery:.0%}"}
            )
        before = old_cells.get(c["id"])
        if before is None:
            out["new_cells"].append(c["id"])
            continue
        if before.get("p50") is None:
            continue
        if c.get("p50") is None:
            out["regressions"].append({"id": c["id"], "why": f"did not run ({'; '.join(c.get('error_messages') or ['no timing'])})"})
            continue
        out["compared"] += 1
        change = c["p50"] / before["p50"] - 1
        if change > regression:
            out["regressions"].append(
                {
                    "id": c["id"],
                    "why": f"{change:+.0%} slower: p50 {fmt_s(c['p50'])} against {fmt_s(before['p50'])} (limit +{regression:.0%})",
                    "old_p50": before["p50"],
                    "new_p50": c["p50"],
                }
            )
    out["missing"] = [i for i in old_cells if i not in seen]
    return out


def render_comparison(result: dict, old_path: str) -> str:
    lines = [f"compared with {old_path}: {result['compared']} cell(s) in both"]
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["new_cells"]:
        lines.append(f"  not in the old report: {', '.join(result['new_cells'])}")
    if result["missing"]:
        lines.append(f"  not measured this time: {', '.join(result['missing'])}")
    if result["regressions"]:
        lines.append(f"REGRESSION: {len(result['regressions'])} cell(s)")
        for r in result["regressions"]:
            lines.append(f"  {r['id']}: {r['why']}")
    else:
        lines.append("no regression")
    return "\n".join(lines)
