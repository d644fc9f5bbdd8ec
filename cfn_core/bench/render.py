"""The report files: ``<prefix>.json`` (everything), ``<prefix>.md`` and ``<prefix>.png``.

The PNG (time against N per combination, log scale) needs matplotlib, the
``plot`` extra (``pip install cfn-core[plot]``); without it the report is
complete, its Markdown says the chart was skipped and why
(:func:`chart_unavailable`), and ``cfn bench`` / ``pytest -m bench`` say so too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CfnError
from .analysis import analyze

FORMAT = "cfn-bench-report/1"


class ReportError(CfnError):
    """A report file cannot be read or written."""


def load_report(path: str | os.PathLike) -> dict:
    """Read a JSON report written by ``cfn bench`` or ``pytest -m bench``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such report") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("cells"), list):
        raise ReportError(f"{path}: not a cfn bench report (expected \"format\": \"{FORMAT}\")")
    return analyze(data)


#: what the report says when the chart cannot be drawn here
NO_MATPLOTLIB = (
    "chart skipped: matplotlib is not installed (the plot extra: pip install 'cfn-core[plot]', "
    "or pip install -r requirements-test.txt in a checkout)"
)


def chart_unavailable() -> str | None:
    """Why :func:`render_png` cannot draw on this machine (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_MATPLOTLIB
    return None


def write_report(report: dict, prefix: str | os.PathLike, *, with_json: bool = True) -> list[Path]:
    """Write JSON, Markdown and (when matplotlib is importable) PNG; return the paths written.

    :param with_json: False renders only (``cfn bench --render``): the Markdown and
        the PNG of a report whose JSON already exists, which is left untouched.
    """
    analyze(report)
    prefix = Path(prefix)
    if prefix.suffix in (".json", ".md", ".png"):
        prefix = prefix.with_suffix("")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        written = []
        if with_json:
            js = prefix.with_name(prefix.name + ".json")
            js.write_text(json.dumps(report, indent=2, default=str) + "\n")
            written.append(js)
        png = prefix.with_name(prefix.name + ".png")
        has_png = render_png(report, png)
        md = prefix.with_name(prefix.name + ".md")
        md.write_text(render_markdown(report, png.name if has_png else None, chart_note=None if has_png else chart_unavailable()))
        written.append(md)
        if has_png:
            written.append(png)
        return written
    except OSError as exc:
        raise ReportError(f"cannot write the report at {prefix}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- formatting


def fmt_s(v) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.2f} ms"
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def fmt_x(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.1%}" if v < 1 else "100%"


def fmt_mib(v) -> str:
    return "-" if not v else f"{v / 2**20:,.0f} MiB"


def fmt_num(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _mark(ok) -> str:
    return "-" if ok is None else "PASS" if ok else "FAIL"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: dict, png_name: str | None = None, chart_note: str | None = None) -> str:
    """The human report: decision gate, the plan-shaped impact report, every cell, phases, additivity.

    :param png_name: the chart to link; :param chart_note: else, why there is none.
    """
    analyze(report)
    s = report["settings"]
    m = report["machine"]
    cells = report["cells"]
    lines = ["# cfn Optimization Impact Report", ""]
    if report.get("interrupted"):
        lines += ["**Interrupted: only the cells below were measured.**", ""]
    if report.get("not_run"):
        lines += [f"**Not run (a worker died or the session stopped): {', '.join(report['not_run'])}.**", ""]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    load = ", ".join(f"{x:.2f}" for x in m.get("load_average", []))
    lines += [
        f"- Created {report['created']} by {report['runner']['description']}.",
        f"- Machine: {m.get('cores')} cores ({m.get('cpu_model') or 'unknown CPU'}), "
        f"{fmt_mib(m.get('memory_bytes'))} RAM, Python {m.get('python')} ({m.get('start_method')} start), "
        f"load average (1/5/15 min) at the start {load}"
        + (f", at the end {', '.join(f'{x:.2f}' for x in m['load_average_end'])}" if m.get("load_average_end") else "")
        + ".",
        f"- Versions: {versions}" + (f"; source at git commit {m['git_commit']}" if m.get("git_commit") else "") + ".",
        f"- Workload: one task per agent, handler `{report['workload'].get('command') or report['workload'].get('handler')}`, "
        f"payload {report['workload'].get('payload_bytes')} bytes; mesh adds {s['mesh_messages']} peer messages per agent. "
        f"Rounds per repetition: {s['rounds']}; repetitions per cell: up to {s['repetitions']}"
        + (f" (a cell stops repeating after {s['cell_budget']:g} s)" if s.get("cell_budget") else "")
        + ".",
        "- Time = one repetition from a cold start: Coordinator open (session start), "
        f"{s['rounds']} round(s), close. Improvement = baseline p50 / cell p50 at the same N and workload, same session.",
        "",
    ]
    gates = report.get("decision_gate", [])
    if gates:
        lines += ["## Decision gate", ""]
        rows = []
        for g in gates:
            if g["outcome"] == "n/a":
                rows.append([f"{g['agents']} agents, {g['workload']}", g["combination"], "-", "-", "-", "n/a", "-"])
                continue
            c = g["checks"]
            rows.append(
                [
                    f"{g['agents']} agents, {g['workload']}",
                    g["combination"],
                    f"{fmt_s(g['seconds'])} (< {s['target_seconds']:g} s: {_mark(c['time'])})",
                    f"{fmt_pct(g['delivery_rate'])} (>= {s['min_delivery']:.0%}: {_mark(c['delivery'])})",
                    f"{fmt_x(g['improvement'])} (>= {s['min_improvement']:g}x: {_mark(c['improvement'])})",
                    f"**{g['outcome']}**",
                    f"{'met' if g['bar_met'] else 'not met'} (<= {fmt_s(s['bar_seconds'])}: {_mark(g['bar']['time'])}, "
                    f">= {s['bar_improvement']:g}x: {_mark(g['bar']['improvement'])})",
                ]
            )
        lines += _table(["scale", "combined", "time p50", "delivery", "improvement", "plan's gate", "our bar"], rows)
        lines += [""]

    # the plan's text block, per workload at the largest N
    for g in gates:
        n, w = g["agents"], g["workload"]
        here = [c for c in cells if c["agents"] == n and c["workload"] == w]
        if not here:
            continue
        lines += [f"## Optimization Impact Report: {n} agents, {w}", "", "```"]
        width = max(len(c["label"]) for c in here) + 1
        for c in here:
            gain = f"({fmt_x(c['improvement'])})" if c["combination"] != "baseline" else ""
            floor = f" {fmt_x(c['vs_floor'])} the floor" if c.get("vs_floor") and c.get("reference") != "floor" else ""
            lines.append(f"{c['label'] + ':':<{width}} {fmt_s(c.get('p50')):>9} {gain}{floor}".rstrip())
        if g["outcome"] != "n/a":
            lines += ["", f"Target: <{s['target_seconds']:g}s, delivery >={s['min_delivery']:.0%}, combined >={s['min_improvement']:g}x",
                      f"Status: {g['outcome']}"]
        lines += ["```", ""]

    if png_name:
        lines += [f"![coordination time against N, log scale]({png_name})", ""]
    elif chart_note:
        lines += [f"*No chart: {chart_note}.*", ""]

    lines += ["## Every cell", ""]
    rows = []
    for c in cells:
        rows.append(
            [
                c["label"],
                str(c["agents"]),
                c["workload"],
                f"{c['repetitions']}",
                fmt_s(c.get("p50")),
                fmt_s(c.get("p95")),
                fmt_s(c.get("p99")),
                fmt_s(c.get("warm_round_p50")),
                fmt_pct(c.get("delivery_rate")),
                fmt_num(c.get("messages_per_second")),
                fmt_x(c.get("improvement")),
                fmt_x(c.get("vs_floor")),
                c["status"],
                f"{fmt_s(c.get('latency_p50'))} / {fmt_s(c.get('latency_p99'))}",
                fmt_mib(c.get("peak_pss_bytes")) + ("~" if c.get("pss_estimated") else ""),
                fmt_num(c.get("peak_fds")),
                "-" if c.get("cpu_percent") is None else f"{c['cpu_percent']:.0f}%",
                "-" if c.get("error_rate_per_1000") is None else f"{c['error_rate_per_1000']:.0f}",
                c.get("bottleneck") or "-",
            ]
        )
    lines += _table(
        ["combination", "N", "workload", "reps", "p50", "p95", "p99", "warm round", "delivery", "msg/s", "vs baseline",
         "vs floor", "status", "latency p50 / p99", "peak PSS", "fds", "CPU", "errors /1000", "bottleneck"],
        rows,
    )
    lines += [
        "",
        f"Status: PASS when p50 < {s['target_seconds']:g} s, delivery >= {s['min_delivery']:.0%}, no failed coordination"
        f" and, for the combined row, improvement >= {s['min_improvement']:g}x. vs floor: p50 / the fork floor row's p50"
        " at the same N (a parent forking N children that each echo one pipe message)."
        " Latency: task sent to result received."
        " Peak PSS: coordinator and agents together, sampled (~: partly estimated from the mean of the measured processes);"
        " fds: the coordinator's; CPU: of the coordinator and its agents, 100% = one core.",
        "",
    ]
    errs = [c for c in cells if c.get("error_messages")]
    if errs:
        lines += ["Errors:", ""] + [f"- {c['id']}: {'; '.join(c['error_messages'])}" for c in errs] + [""]
    fell = [c for c in cells if c.get("fallbacks")]
    if fell:
        lines += ["Plugin steps that failed and ran the baseline instead (cfn's fallback):", ""]
        lines += [f"- {c['id']}: {c['fallbacks']}" for c in fell] + [""]

    lines += ["## Where the time goes (median seconds per phase)", ""]
    phase_names = ["session", "spawn", "ready", "distribute", "execute", "collect", "shutdown"]
    rows = []
    for c in cells:
        ph = c.get("phases") or {}
        rows.append([c["label"], str(c["agents"]), c["workload"]] + [fmt_s(ph.get(p)) if ph.get(p) else "-" for p in phase_names]
                    + [c.get("bottleneck") or "-"])
    lines += _table(["combination", "N", "workload"] + phase_names + ["bottleneck"], rows)
    lines += ["", "session = Coordinator open + close (a pool's zygote and pre-spawned agents start there).", ""]

    figures = []
    for g in gates:
        for c in cells:
            if c["agents"] == g["agents"] and c["workload"] == g["workload"] and c.get("plugin_figures"):
                for plugin, values in c["plugin_figures"].items():
                    if not isinstance(values, dict):
                        continue
                    shown = ", ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in values.items()
                        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v not in ("", None)
                    )
                    figures.append(f"- {c['id']}, {plugin}: {shown}")
    if figures:
        lines += ["## What the plugins report (last repetition, largest N)", ""] + figures + [""]

    add = report.get("additivity", [])
    if add:
        lines += ["## Are the optimizations additive?", ""]
        rows = [
            [a["combination"], str(a["agents"]), a["workload"], fmt_x(a["gain"]),
             " x ".join(f"{k} {fmt_x(v)}" for k, v in a["individual_gains"].items()),
             fmt_x(a["product_of_individual_gains"]), "-" if a["ratio"] is None else f"{a['ratio']:.2f}", a["verdict"]]
            for a in add
        ]
        lines += _table(["combination", "N", "workload", "gain", "alone", "product", "gain / product", "verdict"], rows)
        lines += ["", "Gains that multiply (ratio ~1) come from plugins removing different costs; a ratio well under 1 "
                  "means they speed up the same phase, so the second one has less left to remove.", ""]
    return "\n".join(lines)


def render_png(report: dict, path: Path) -> bool:
    """Coordination time (p50) against N per combination, log scale.

    False when nothing was drawn: no matplotlib (:func:`chart_unavailable` says so), or no cell has a time.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in report["cells"] if c.get("p50")]
    workloads = sorted({c["workload"] for c in cells})
    if not cells:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        combos: dict[str, list[dict]] = {}
        for c in cells:
            if c["workload"] == w:
                combos.setdefault(c["label"], []).append(c)
        for label, rows in combos.items():
            rows.sort(key=lambda c: c["agents"])
            ref = rows[0]["kind"] == "reference"
            ax.plot([c["agents"] for c in rows], [c["p50"] for c in rows], marker="o",
                    linestyle="--" if ref else "-", linewidth=1 if ref else 2, label=label)
        s = report["settings"]
        ax.axhline(s["target_seconds"], color="red", linewidth=0.8, linestyle=":", label=f"target {s['target_seconds']:g} s")
        ax.set_yscale("log")
        ax.set_xlabel("agents (N)")
        ax.set_ylabel("coordination time p50, seconds (log)")
        ax.set_title(f"{w} workload, {report['machine'].get('cores')} cores")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
