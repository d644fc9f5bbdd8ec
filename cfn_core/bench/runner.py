"""Time the cells of the matrix.

One repetition of a cfn cell is one fresh ``Coordinator`` on the cell's
configuration: open (session start: a pool's zygote and pre-spawned agents),
``rounds`` coordinations, close.  Its time is that whole span, what ``cfn run``
costs a user from a cold start; later rounds are also reported alone (warm
reuse).  Each repetition is measured while :class:`ResourceSampler` watches the
process tree.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable

from ..errors import CfnError
from ..report import percentile
from .matrix import Cell
from .resources import ResourceSampler

#: phases of a cell, in the order a coordination goes through them
PHASES = ("session", "spawn", "ready", "distribute", "execute", "collect", "shutdown")

Step = Callable[[str], None]


def cell_config(base, bench, cell: Cell):
    """The configuration one repetition of ``cell`` runs with (validated like a file).

    Always ``[run] strict``: a plugin step that fails stops the repetition
    instead of running the baseline for it, so a cell named after a plugin
    measures that plugin or fails; it never reports the baseline's time under
    the plugin's name.
    """
    mesh = cell.workload == "mesh"
    return base.evolve(
        plugins=list(cell.plugins),
        workload={
            "agents": cell.agents,
            "rounds": bench.rounds,
            "topology": cell.workload,
            "tasks": 0,
            "messages_per_agent": bench.mesh_messages if mesh else 0,
        },
        run={"max_agents": max(base.run.max_agents, cell.agents), "metrics_port": 0, "metrics_file": "", "strict": True},
    )


def _run_cfn(config, step: Step | None) -> dict:
    from ..coordinator import Coordinator

    def progress(phase: str, done: int, total: int) -> None:
        if step is not None:
            step(f"{phase} {done}/{total}")

    rep: dict = {"error": None}
    t0 = time.perf_counter()
    coord = Coordinator(config, progress=progress)
    try:
        coord.open()  # an interrupt cannot split its critical steps (see interrupts_deferred)
        t_open = time.perf_counter()
        result = coord.run()
        t_run = time.perf_counter()
    finally:
        t_closing = time.perf_counter()
        coord.close()
        t_end = time.perf_counter()
    rep["seconds"] = t_end - t0
    phases = {p: 0.0 for p in PHASES}
    phases["session"] = (t_open - t0) + (t_end - t_closing)
    for name, value in result.phases().items():
        phases[name] = phases.get(name, 0.0) + value
    phases["other"] = max(0.0, (t_run - t_open) - sum(r.seconds for r in result.rounds))
    rep["phases"] = phases
    rep["rounds"] = [
        {
            "seconds": r.seconds,
            "ok": r.failed == 0 and r.delivered == r.planned,
            "planned": r.planned,
            "delivered": r.delivered,
            "failed": r.failed,
            "retries": r.retries,
            "latency_p50": r.latency_p50,
            "latency_p99": r.latency_p99,
            "errors": sorted({x.error for x in r.results.values() if x.error})[:3],
        }
        for r in result.rounds
    ]
    rep["planned"] = result.planned
    rep["delivered"] = result.delivered
    rep["failed"] = result.failed
    rep["fallbacks"] = sum(int(f.get("count", 1)) for f in result.fallbacks)
    rep["plugin_figures"] = result.plugin_figures
    return rep


def _run_reference(cell: Cell, payload: str, probe=None) -> dict:
    from .references import RUNNERS

    rep = RUNNERS[cell.reference](cell.agents, payload, probe=probe)
    rep["error"] = None
    ok = rep["failed"] == 0 and rep["delivered"] == rep["planned"]
    rep["rounds"] = [
        {"seconds": rep["seconds"], "ok": ok, "planned": rep["planned"], "delivered": rep["delivered"],
         "failed": rep["failed"], "latency_p50": None, "latency_p99": None, "errors": []}
    ]
    return rep


class CellRun:
    """The repetitions of one cell, run one at a time.

    ``cfn bench`` alternates the cells of one agent count and workload repetition by
    repetition (:func:`run_interleaved`), so a slow stretch of the machine, or what a
    heavy cell leaves behind, falls on every row of the comparison rather than on the
    rows that happened to come next; ``pytest -m bench`` times each cell as one test
    (:func:`run_cell`).
    """

    def __init__(self, cell: Cell, base, bench, step: Step | None = None):
        self.cell, self.base, self.bench, self.step = cell, base, bench, step
        self.reps: list[dict] = []
        self.spent = 0.0  # seconds of this cell's own repetitions (the cell budget)
        self.stopped = False  # a configuration error: the same every time
        self.started_at = time.time()
        self.payload = "x" * base.workload.payload_bytes

    @property
    def done(self) -> bool:
        """Every repetition ran, its budget is spent, or it cannot run."""
        bench = self.bench
        return (
            self.stopped
            or len(self.reps) >= bench.repetitions
            or bool(self.reps and bench.cell_budget and self.spent >= bench.cell_budget)
        )

    def run_one(self) -> None:
        """One timed repetition."""
        cell, step = self.cell, self.step
        prefix = f"{cell.id} rep {len(self.reps) + 1}/{self.bench.repetitions}"
        if step is not None:
            step(prefix)
        t0 = time.perf_counter()
        sampler = ResourceSampler().start()
        try:
            if cell.reference:
                rep = _run_reference(cell, self.payload)
            else:
                rep = _run_cfn(cell_config(self.base, self.bench, cell), (lambda s: step(f"{prefix} {s}")) if step else None)
        except CfnError as exc:  # a configuration this cell cannot run: the same every time
            rep = {"error": f"{type(exc).__name__}: {exc}", "seconds": None, "rounds": []}
            self.stopped = True
        except Exception as exc:  # noqa: BLE001  (a crash is a measured error of this combination)
            rep = {"error": f"{type(exc).__name__}: {exc}", "seconds": None, "rounds": []}
        finally:
            resources = sampler.stop()
        rep["resources"] = resources
        self.reps.append(rep)
        self.spent += time.perf_counter() - t0

    def finish(self, resource_pass: bool = True) -> dict:
        """The cell's summary (with an untimed memory pass for a fast cell, unless told not to)."""
        summary = summarize(self.cell, self.reps, self.bench)
        if resource_pass and summary["min"] is not None and summary["min"] < RESOURCE_PASS_BELOW and not summary["error_messages"]:
            _resource_pass(self.cell, self.base, self.bench, self.payload, summary)
        summary["started"], summary["finished"] = self.started_at, time.time()
        return summary


def run_cell(cell: Cell, base, bench, step: Step | None = None) -> dict:
    """Time ``cell``: up to ``[bench] repetitions`` runs, fewer once ``cell_budget`` is spent."""
    run = CellRun(cell, base, bench, step)
    while not run.done:
        run.run_one()
    return run.finish()


def comparison_groups(cells: list[Cell]) -> list[list[Cell]]:
    """``cells`` in groups of one agent count and workload (the rows a report compares), in order."""
    groups: dict[tuple[int, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.agents, cell.workload), []).append(cell)
    return list(groups.values())


def run_interleaved(group: list[Cell], base, bench, step: Step | None = None) -> list[dict]:
    """Time the cells of one comparison with their repetitions alternating.

    Round ``i`` runs repetition ``i`` of every cell not done yet, in the group's order
    on even rounds and reversed on odd ones (so no cell always follows the same
    neighbour).  Each cell keeps its own repetition count and budget; the memory
    passes run after every timed repetition of the group.  Interrupted, the cells that
    ran at least once are summarized (without their memory pass) and attached to the
    exception as ``partial`` before it propagates.
    """
    runs = [CellRun(cell, base, bench, step) for cell in group]
    i = 0
    try:
        while not all(r.done for r in runs):
            for run in runs if i % 2 == 0 else reversed(runs):
                if not run.done:
                    run.run_one()
            i += 1
    except BaseException as exc:
        exc.partial = [r.finish(resource_pass=False) for r in runs if r.reps]  # type: ignore[attr-defined]
        raise
    return [r.finish() for r in runs]


#: cells faster than this (seconds) get an extra untimed repetition for their memory figures
RESOURCE_PASS_BELOW = 5.0


def _resource_pass(cell: Cell, base, bench, payload: str, summary: dict) -> None:
    """One more repetition, untimed, sampled back to back: the peak PSS of a fast cell."""
    sampler = ResourceSampler(duty=None, slice_seconds=1.0).start()
    error = None
    try:
        if cell.reference:
            # a reference run can end between two passes of the sampler: measure while its workers live
            _run_reference(cell, payload, probe=sampler.sample)
        else:
            _run_cfn(cell_config(base, bench, cell), None)
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    finally:
        figures = sampler.stop()
    summary["resource_pass"] = {"error": error, **figures}
    if error:
        summary["error_messages"].append(f"resource pass: {error}")
        return
    for key in ("peak_pss_bytes", "pss_estimated", "peak_fds", "peak_processes"):
        summary[key] = figures[key]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(cell: Cell, reps: list[dict], bench) -> dict:
    """The figures of one cell from its repetitions (raw repetitions kept under ``reps``)."""
    timed = [r for r in reps if r.get("seconds") is not None]
    seconds = [r["seconds"] for r in timed]
    rounds = [x for r in timed for x in r["rounds"]]
    warm = [x["seconds"] for r in timed for x in r["rounds"][1:]]
    planned = sum(r.get("planned", 0) for r in timed)
    delivered = sum(r.get("delivered", 0) for r in timed)
    coordinations = sum(max(1, len(r.get("rounds") or [])) for r in reps) if reps else 0
    errors = sum(1 for r in reps if r.get("error")) + sum(1 for x in rounds if not x["ok"])
    messages = []
    for r in timed:
        if r["seconds"] > 0:
            messages.append(r.get("delivered", 0) / r["seconds"])
    phase_names = list(PHASES) + sorted({k for r in timed for k in r.get("phases", {})} - set(PHASES))
    phases = {p: _median([r.get("phases", {}).get(p, 0.0) for r in timed]) for p in phase_names}
    res = [r["resources"] for r in reps]
    error_messages = []
    for r in reps:
        for msg in [r.get("error")] + [e for x in r.get("rounds", []) for e in x.get("errors", [])]:
            if msg and msg not in error_messages:
                error_messages.append(msg)
    out = cell.to_dict()
    out.update(
        {
            "repetitions": len(reps),
            "rounds": bench.rounds,
            "coordinations": coordinations,
            "seconds": seconds,
            "p50": percentile(seconds, 50),
            "p95": percentile(seconds, 95),
            "p99": percentile(seconds, 99),
            "min": min(seconds) if seconds else None,
            "warm_round_p50": percentile(warm, 50),
            "messages_planned": planned,
            "messages_delivered": delivered,
            "delivery_rate": delivered / planned if planned else (None if not timed else 1.0),
            "messages_per_second": _median(messages),
            "phases": phases,
            "latency_p50": _median([x.get("latency_p50") for x in rounds]),
            "latency_p99": _median([x.get("latency_p99") for x in rounds]),
            "peak_pss_bytes": max((x["peak_pss_bytes"] or 0 for x in res), default=0) or None,
            "pss_estimated": any(x["pss_estimated"] for x in res),
            "peak_fds": max((x["peak_fds"] or 0 for x in res), default=0) or None,
            "peak_processes": max((x["peak_processes"] for x in res), default=0),
            "cpu_percent": _median([x["cpu_percent"] for x in res]),
            "sampling_seconds": sum(x["sampling_seconds"] for x in res),
            "errors": errors,
            "error_rate_per_1000": 1000.0 * errors / coordinations if coordinations else None,
            "error_messages": error_messages[:5],
            "fallbacks": sum(r.get("fallbacks", 0) for r in timed),
            "plugin_figures": timed[-1].get("plugin_figures", {}) if timed else {},
            "reps": reps,
        }
    )
    return out


def cell_problems(summary: dict, min_delivery: float) -> list[str]:
    """Why a cell did not work (a crash, failed tasks, delivery under the floor); [] when it did."""
    problems = list(summary["error_messages"])
    rate = summary["delivery_rate"]
    if rate is not None and rate < min_delivery:
        problems.append(f"delivery {rate:.2%} is below the floor {min_delivery:.0%}")
    if summary["errors"] and not problems:
        problems.append(f"{summary['errors']} of {summary['coordinations']} coordinations failed")
    if summary.get("fallbacks"):  # cells run strict; a report measured otherwise still says so
        problems.append(f"{summary['fallbacks']} plugin step(s) fell back to the baseline: the cell did not measure its plugins")
    return problems


def machine_info() -> dict:
    """Where the numbers come from: cores, CPU, memory, Python, versions, load at the start."""
    import importlib.metadata as md

    import psutil

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("cfn-core", "pluggy", "psutil", "orjson", "attrs", "pytest", "pytest-xdist", "matplotlib", "redis"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        from ..plugins import installed

        for name, ep in sorted(installed().items()):
            if ep.dist is not None:
                versions[ep.dist.metadata["Name"]] = ep.dist.version
    except Exception:  # noqa: BLE001  (machine info must never stop a benchmark)
        pass
    return {
        "git_commit": _git_commit(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "start_method": __import__("multiprocessing").get_start_method(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def _git_commit() -> str | None:
    """The commit of the source tree cfn runs from, when it is a git checkout (editable install)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def runner_info(tool: str, overlap: bool, workers: int) -> dict:
    """The report's ``runner``: what timed the cells, in which mode, on how many workers."""
    return {
        "tool": tool,
        "mode": "parallel" if overlap else "serial",
        "workers": workers,
        "description": (
            f"{tool}; {'timing cells overlapped on ' + str(workers) + ' workers' if overlap else 'one timing cell at a time'}"
            f" on {os.cpu_count()} cores"
        ),
    }


def new_report(bench, base, *, tool: str, overlap: bool, workers: int) -> dict:
    """The report skeleton, made when the session *starts*: its time and load average are the start's.

    Machine, mode, settings; cells are appended as they finish; :func:`finish_report`
    stamps the end.
    """
    import attrs

    return {
        "format": "cfn-bench-report/1",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runner": runner_info(tool, overlap, workers),
        "machine": machine_info(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(bench).items()},
        "workload": {
            "handler": base.workload.handler,
            "command": base.workload.command,
            "payload_bytes": base.workload.payload_bytes,
        },
        "cells": [],
    }


def finish_report(report: dict) -> dict:
    """Stamp the end of the session: time and load average (a busy machine shows here)."""
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    report["machine"]["load_average_end"] = list(os.getloadavg())
    return report
