"""``cfn bench``: run the [bench] matrix without pytest and write the report.

Exit codes: 0 every cell ran and delivered (and no regression with
``--compare``); 1 a regression, or a cell that failed or delivered under the
floor; 2 a usage or configuration error (one line); 130 interrupted (the cells
done so far are still written).
"""

from __future__ import annotations

import json
import signal
import sys
import time

from ..errors import CfnError
from ..hookspecs import hookimpl

# flag -> [bench] key
FLAGS = {
    "agents": ("bench.agents", "N", "agent counts, e.g. 100,200,300,500"),
    "combinations": ("bench.combinations", "C", "combinations: default, all, each, combined, baseline or pool+batch (comma-separated)"),
    "matrix_plugins": ("bench.plugins", "A,B", "plugins the keyword combinations are built from (default: the bundled optimization plugins)"),
    "workloads": ("bench.workloads", "W", "star, mesh or star,mesh"),
    "repetitions": ("bench.repetitions", "R", "timed repetitions per cell"),
    "rounds": ("bench.rounds", "R", "coordinations per repetition (later rounds show warm reuse)"),
    "cell_budget": ("bench.cell_budget", "S", "stop repeating a cell after this many seconds (0: never)"),
    "output": ("bench.output", "PREFIX", "write PREFIX.json, PREFIX.md and PREFIX.png"),
}


@hookimpl
def cfn_add_commands(subparsers) -> None:
    """Add ``cfn bench`` (the kernel's command modules use the same hook as any plugin)."""
    p = subparsers.add_parser(
        "bench",
        help="run the benchmark matrix ([bench] in cfn.toml) and write the Optimization Impact Report",
        description="Time every plugin combination at every agent count against the baseline, in one session.",
    )
    p.add_argument("--config", metavar="PATH", help="cfn.toml or pyproject.toml (default: found upward from here)")
    p.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE", help="override any setting (repeatable)")
    for name, (key, metavar, help_) in FLAGS.items():
        flag = "--plugins" if name == "matrix_plugins" else "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, metavar=metavar, help=f"{help_} ({key})")
    p.add_argument("--no-references", action="store_true", help="skip the ProcessPoolExecutor / multiprocessing rows")
    p.add_argument("--compare", metavar="PATH", help="regression gate: exit 1 if a cell is slower than in this old JSON report")
    p.add_argument("--render", metavar="PATH",
                   help="run nothing: write the Markdown/PNG of an existing JSON report (next to it, or at --output); "
                        "the JSON is left as it is and nothing is printed but the paths")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the Markdown")
    p.add_argument("--list", action="store_true", help="print the cells of the matrix and exit")
    p.set_defaults(func=cmd_bench)


def _overrides(args) -> dict:
    out = {}
    for name, (key, _m, _h) in FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            out[key] = value
    if args.no_references:
        out["bench.references"] = "false"
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise CfnError(f"--set {item!r}: use TABLE.KEY=VALUE, e.g. --set bench.repetitions=5")
        out[key.strip()] = value
    return out


class Progress:
    """A bar on stderr: live on a terminal, one line per finished cell otherwise."""

    def __init__(self, total: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.last = ""

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60}:{s % 60:02d}"

    def step(self, text: str) -> None:
        if not self.live:
            return
        width = 24
        filled = width * self.done // self.total if self.total else width
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} cells {self._elapsed()}  {text}"[:160]
        pad = max(0, len(self.last) - len(line))
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self.last = line

    def cell_done(self, summary: dict) -> None:
        from .render import fmt_pct, fmt_s

        self.done += 1
        text = (
            f"{summary['id']}: p50 {fmt_s(summary.get('p50'))} over {summary['repetitions']} rep(s), "
            f"delivery {fmt_pct(summary.get('delivery_rate'))}"
            + (f", ERROR {summary['error_messages'][0]}" if summary.get("error_messages") else "")
        )
        if self.live:
            self.step(text)
        else:
            self.stream.write(f"cfn bench: [{self.done}/{self.total}] {self._elapsed()} {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.live and self.last:
            self.stream.write("\n")
            self.stream.flush()


class _Terminated(BaseException):  # not an Exception: a cell must not record it as its own error
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def cmd_bench(args) -> int:
    from ..config import load_config
    from .matrix import expand, installed_plugins, optimization_plugins
    from .render import chart_unavailable, load_report, render_markdown, write_report
    from .runner import cell_problems, comparison_groups, finish_report, new_report, run_interleaved

    if args.render:  # render only: the input JSON is the record, never rewritten; stdout stays quiet
        report = load_report(args.render)
        old = load_report(args.compare) if args.compare else None
        prefix = args.output or args.render
        paths = write_report(report, prefix, with_json=False)
        _say_written(paths)
        s = report["settings"]
        return _gate(report, old, args.compare, s["regression"], s["min_delivery"])

    config = load_config(args.config, overrides=_overrides(args))
    bench = config.section("bench")
    old = load_report(args.compare) if args.compare else None  # a bad path fails before an hour of benchmarks
    cells = expand(bench, installed_plugins(), optimization_plugins())
    if args.list:
        for cell in cells:
            print(cell.id)
        return 0
    report = new_report(bench, config, tool="cfn bench", overlap=False, workers=1)
    progress = Progress(len(cells))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0

    def take(summaries) -> None:
        nonlocal code
        for summary in summaries:
            report["cells"].append(summary)
            progress.cell_done(summary)
            if cell_problems(summary, bench.min_delivery):
                code = 1

    try:
        for group in comparison_groups(cells):  # the rows of one N and workload, repetitions alternating
            take(run_interleaved(group, config, bench, step=progress.step))
    except (KeyboardInterrupt, _Terminated) as exc:
        take(getattr(exc, "partial", []))  # the cells of the interrupted comparison that ran
        code = 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    if not report["cells"]:
        return code
    if code in (130, 143):
        report["interrupted"] = True
    paths = write_report(finish_report(report), bench.output)
    print(json.dumps(report, indent=2, default=str) if args.json else render_markdown(report, chart_note=chart_unavailable()))
    _say_written(paths)
    if code in (130, 143):
        return code
    return max(code, _gate(report, old, args.compare, bench.regression, bench.min_delivery))


def _say_written(paths) -> None:
    """The files written, on stderr, and why there is no chart when there is none."""
    from .render import chart_unavailable

    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    note = chart_unavailable()
    if note:
        print(f"cfn bench: {note}", file=sys.stderr)


def _gate(report: dict, old: dict | None, old_path: str | None, regression: float, min_delivery: float) -> int:
    """--compare: print the comparison on stderr; 1 when a cell regressed."""
    from .compare import compare, render_comparison

    if old is None:
        return 0
    result = compare(report, old, regression=regression, min_delivery=min_delivery)
    print(render_comparison(result, old_path), file=sys.stderr)
    return 1 if result["regressions"] else 0
