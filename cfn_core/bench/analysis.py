"""The ratios and verdicts of a report: improvement, targets, additivity, decision gate.

Everything here is computed from the cells of one report (one session), so a
ratio never mixes runs: the improvement of a cell is the baseline's p50 divided
by the cell's p50 at the same N and workload, and ``vs_floor`` is the cell's
p50 divided by the fork floor reference row's (how far above the least a
Python parent can spend on the same N processes; None without that row).  :func:`analyze` is idempotent
and is run again when a report is rendered from a JSON file.
"""

from __future__ import annotations

import math

#: the reference row every time is also divided by (``vs_floor``): the raw fork floor
FLOOR = "floor"

MAIN_PHASES = ("session", "spawn", "ready", "distribute", "execute", "collect", "shutdown", "other")


def settings_with_defaults(settings: dict | None) -> dict:
    """The report's [bench] settings, completed with today's defaults (older or hand-written reports)."""
    import attrs

    from ..config import BenchSettings

    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(BenchSettings()).items()}
    return {**defaults, **(settings or {})}


def combined_plugins(cells: list[dict]) -> tuple[str, ...]:
    """Every plugin that appears in the matrix, in first-seen order (the "all combined" row)."""
    seen: dict[str, None] = {}
    for c in cells:
        if c["kind"] == "cfn":
            for p in c["plugins"]:
                seen.setdefault(p)
    return tuple(seen)


def bottleneck(phases: dict) -> str | None:
    """The phase with the most time, or None without timings."""
    items = [(v, k) for k, v in phases.items() if v is not None and v > 0]
    return max(items)[1] if items else None


def analyze(report: dict) -> dict:
    """Add the derived figures to ``report`` (in place) and return it."""
    s = report["settings"] = settings_with_defaults(report.get("settings"))
    cells = report["cells"]
    cfn_cells = [c for c in cells if c["kind"] == "cfn"]
    key = lambda c: (frozenset(c["plugins"]), c["agents"], c["workload"])  # noqa: E731
    by_key = {key(c): c for c in cfn_cells}
    combined = frozenset(combined_plugins(cells))
    floors = {(c["agents"], c["workload"]): c for c in cells if c["kind"] == "reference" and c.get("reference") == FLOOR}
    for c in cells:
        base = by_key.get((frozenset(), c["agents"], c["workload"]))
        gain = None
        if base and base.get("p50") and c.get("p50"):
            gain = base["p50"] / c["p50"]
        c["improvement"] = gain
        floor = floors.get((c["agents"], c["workload"]))
        c["vs_floor"] = c["p50"] / floor["p50"] if floor and floor.get("p50") and c.get("p50") else None
        c["is_combined"] = c["kind"] == "cfn" and bool(combined) and frozenset(c["plugins"]) == combined
        checks = {}
        if c.get("p50") is not None:
            checks["time"] = c["p50"] < s["target_seconds"]
        if c.get("delivery_rate") is not None:
            checks["delivery"] = c["delivery_rate"] >= s["min_delivery"]
        if c["is_combined"] and gain is not None:
            checks["improvement"] = gain >= s["min_improvement"]
        c["checks"] = checks
        if c.get("p50") is None:
            c["status"] = "ERROR"
        else:
            # a fallback means the baseline ran under the plugin's name: never a PASS
            c["status"] = "PASS" if all(checks.values()) and not c.get("errors") and not c.get("fallbacks") else "FAIL"
        c["bottleneck"] = bottleneck(c.get("phases") or {})
    report["additivity"] = additivity(cfn_cells, by_key)
    report["decision_gate"] = decision_gate(report, by_key, combined)
    return report


def additivity(cfn_cells: list[dict], by_key: dict) -> list[dict]:
    """For every multi-plugin cell: its gain against the product of its members' gains alone.

    ``ratio`` 1.0 means the gains multiply (each plugin removes its own share of
    the time); below 1 they overlap; below the best single gain they interfere.
    """
    rows = []
    for c in cfn_cells:
        if len(c["plugins"]) < 2 or not c.get("improvement"):
            continue
        singles = [by_key.get((frozenset([p]), c["agents"], c["workload"])) for p in c["plugins"]]
        if not all(s and s.get("improvement") for s in singles):
            continue
        gains = {s["plugins"][0]: s["improvement"] for s in singles}
        product = math.prod(gains.values())
        ratio = c["improvement"] / product if product else None
        best = max(gains.values())
        if ratio is not None and ratio > 1.1:
            verdict = "more than multiplicative (a plugin that loses alone gains in company)"
        elif ratio is not None and ratio >= 0.9:
            verdict = "additive (the gains multiply)"
        elif c["improvement"] >= best:
            verdict = "overlapping (better than any one alone)"
        else:
            verdict = "interfering (worse than the best one alone)"
        rows.append(
            {
                "combination": c["combination"],
                "agents": c["agents"],
                "workload": c["workload"],
                "gain": c["improvement"],
                "individual_gains": gains,
                "product_of_individual_gains": product,
                "ratio": ratio,
                "best_single_gain": best,
                "verdict": verdict,
            }
        )
    return rows


def decision_gate(report: dict, by_key: dict, combined: frozenset) -> list[dict]:
    """The plan's Phase 3 decision gate and our own bar, per workload at the largest N.

    GO: time < target_seconds, delivery >= min_delivery, combined gain >= min_improvement.
    NO-GO: time > 1.5 x target or delivery more than 5 points under the floor.
    PIVOT: anything in between.
    """
    s = report["settings"]
    out = []
    workloads = sorted({w for (_p, _n, w) in by_key})
    for w in workloads:
        sizes = sorted({n for (_p, n, ww) in by_key if ww == w})
        if not sizes:
            continue
        n = sizes[-1]
        cell = by_key.get((combined, n, w))
        row = {"workload": w, "agents": n, "combination": "+".join(sorted(combined)) or "baseline"}
        if cell is None or cell.get("p50") is None:
            row.update({"outcome": "n/a", "reason": "the combined row was not measured at this N"})
            out.append(row)
            continue
        row["combination"] = cell["combination"]
        t, rate, gain = cell["p50"], cell.get("delivery_rate"), cell.get("improvement")
        row.update({"seconds": t, "delivery_rate": rate, "improvement": gain})
        row["checks"] = {
            "time": t < s["target_seconds"],
            "delivery": rate is not None and rate >= s["min_delivery"],
            "improvement": gain is not None and gain >= s["min_improvement"],
        }
        if all(row["checks"].values()):
            row["outcome"] = "GO"
        elif t > 1.5 * s["target_seconds"] or rate is None or rate < s["min_delivery"] - 0.05:
            row["outcome"] = "NO-GO"
        else:
            row["outcome"] = "PIVOT"
        row["bar"] = {
            "time": t <= s["bar_seconds"],
            "improvement": gain is not None and gain >= s["bar_improvement"],
        }
        row["bar_met"] = all(row["bar"].values())
        out.append(row)
    return out
