"""The compact live view ``cfn run`` shows on a terminal (a few lines of what ``cfn top`` shows).

While agents start it is the spawn line (agents ready and started, their rate, the time
left); once the coordinator publishes snapshots (:mod:`cfn_core.live`, four times a
second) it adds the counts per role and state, the tasks done / failed / retried /
queued, the throughput and latency, how many agents look stalled, and the few agents
with the longest-running tasks.  It is drawn on stderr with rich, in place, at most
:attr:`RunView.INTERVAL` apart, and removed when the run ends, so the summary printed
after it stands alone.  Not a terminal: nothing (logs and pipes get the summary only).
rich is imported on the first frame, in the coordinator's process alone: agents never
load it.

It is driven by the coordinator's progress callback, so it runs in the coordinator's
thread between two of its steps and reads the snapshot the coordinator last built (no
second pass over the agents, nothing shared with another thread).
"""

from __future__ import annotations

import sys
import time
from typing import Any

#: agents listed under the counts (those with the longest-running tasks)
AGENT_ROWS = 5
#: seconds without progress after which a busy agent counts as stalled (as ``cfn top``)
STALL_SECONDS = 60.0


def bar(done: int, total: int, width: int = 30) -> str:
    filled = min(width, int(width * done / total)) if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def duration(seconds: float) -> str:
    """'45 s', '2 min 05 s', '1 h 03 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def compact_lines(snapshot: dict[str, Any], *, now: float | None = None, rows: int = AGENT_ROWS,
                  stall_seconds: float = STALL_SECONDS) -> list[str]:
    """The view's lines for one snapshot (plain text: the caller styles nothing but the frame)."""
    now = time.time() if now is None else now
    age = max(0.0, now - float(snapshot.get("written_at") or now))
    tasks = snapshot.get("tasks") or {}
    agents = list(snapshot.get("agents") or [])
    busy = [a for a in agents if a.get("task") is not None]
    stalled = sum(1 for a in busy if (a.get("quiet") or 0) + age >= stall_seconds)
    latency = snapshot.get("latency_p50")
    roles = "  ".join(
        f"{role}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        for role, counts in sorted((snapshot.get("by_role") or {}).items())
    )
    lines = [
        f"agents {len(agents)}  {roles}".rstrip(),
        f"tasks {tasks.get('done', 0)} done, {tasks.get('failed', 0)} failed, {tasks.get('retried', 0)} retried, "
        f"{tasks.get('queued', 0)} queued   {snapshot.get('throughput') or 0:.1f} tasks/s   "
        f"p50 {'-' if latency is None else f'{latency * 1000:.1f}ms'}   stalled {stalled}",
    ]
    busy.sort(key=lambda a: -(a.get("elapsed") or 0.0))
    for a in busy[:rows]:
        status = a.get("status") or ""
        lines.append(
            f"  {a.get('id')}  {a.get('role')}  {a.get('task')}  {(a.get('elapsed') or 0.0) + age:.1f}s"
            + (f"  {status}" if status else "")
        )
    if len(busy) > rows:
        lines.append(f"  ... and {len(busy) - rows} more busy agents (cfn top shows them all)")
    return lines


class RunView:
    """``callback(phase, done, total)`` for :class:`cfn_core.Coordinator`, drawing the view.

    :param snapshot: returns the coordinator's latest snapshot (None before the first).
    """

    #: seconds between two frames (the callback can be called thousands of times a second)
    INTERVAL = 0.25

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.snapshot = lambda: None
        self._live = None
        self._console = None
        self.last_at = 0.0
        self.started = 0
        self.spawn_t0: float | None = None
        self.line = ""

    def attach(self, snapshot) -> None:
        """Where the snapshots come from (a callable returning the latest or None)."""
        self.snapshot = snapshot

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase == "started":  # shown with the next "spawn" report
            self.started = done
            return
        if phase == "spawn":
            if self.spawn_t0 is None or (done == 0 and self.started == 0):
                self.spawn_t0 = now
            line = self._spawn_line(done, total, now)
        else:
            self.spawn_t0, self.started = None, 0
            line = f"{phase:<10} {bar(done, total)} {done}/{total}"
        finished = bool(total) and done >= total
        if now - self.last_at < self.INTERVAL and not (finished and line != self.line):
            return
        self.line, self.last_at = line, now
        self._draw(line)

    def _spawn_line(self, ready: int, total: int, now: float) -> str:
        elapsed = now - (self.spawn_t0 or now)
        rate = ready / elapsed if elapsed > 0 else 0.0
        head = f"{'spawn':<10} {bar(ready, total)} {ready}/{total} ready" if total else f"{'spawn':<10} {ready} ready"
        line = f"{head}, {max(self.started, ready)} started"
        if rate > 0:
            line += f", {rate:.1f}/s"
            if total and ready < total:
                line += f", ETA {duration((total - ready) / rate)}"
        return line

    def _draw(self, line: str) -> None:
        from rich.text import Text

        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream, highlight=False)
            self._live = Live(console=self._console, auto_refresh=False, transient=True, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()
        snapshot = self.snapshot()
        text = Text(line, style="bold")
        if snapshot is not None:
            width = max(20, self._console.size.width - 1)
            for extra in compact_lines(snapshot):
                text.append("\n" + extra[:width])
        self._live.update(text, refresh=True)

    def done(self) -> None:
        """Remove the view (the summary is printed after it)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
