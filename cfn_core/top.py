"""``cfn top`` and ``cfn stop``: watch or end a running coordination from another terminal.

Both find the run like ``cfn clean`` does (run directories of this user under the bus
root, :func:`cfn_core.bus.shm.find_runs`): with one live run no argument is needed, with
several they are listed and one must be named.  ``cfn top`` only reads: the snapshot the
coordinator rewrites a few times a second (:mod:`cfn_core.live`) and, for the agents
shown, their resident memory from ``/proc``.  It writes nothing and starts nothing, so it
leaves nothing behind however it or the run ends.  ``cfn stop`` writes one file, the
run's ``state/stop`` request, which the coordinator removes with its run directory.

rich draws the view; it is imported here only, and this module only by the two commands,
so no agent ever loads it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CfnError

#: seconds without progress (no message from a busy agent, no new task) after which an
#: agent is shown as stalled, unless ``cfn top --stall-seconds`` says otherwise
STALL_SECONDS = 60.0
#: a snapshot older than this (seconds) while its coordinator lives is said to be old
_OLD_SNAPSHOT = 5.0
_STATES = ("starting", "ready", "busy", "stopping")


class RunGone(Exception):
    """The run being watched has ended (``killed``: its coordinator died without cleaning up)."""

    def __init__(self, message: str, killed: bool):
        super().__init__(message)
        self.killed = killed


# ---------------------------------------------------------------------- finding the run


def _root(args) -> str:
    if getattr(args, "root", None):
        if not os.path.isdir(args.root):
            raise CfnError(f"--root {args.root}: no such directory")
        return args.root
    from .bus.shm import default_root
    from .config import load_config

    root = load_config(args.config).bus.root or default_root()
    if not os.path.isdir(root):
        raise CfnError(f"[bus] root {root}: no such directory")
    return root


def choose_run(name: str | None, root: str, command: str) -> Path | int:
    """The run directory ``name`` designates, or the only live one; else an exit status.

    ``name`` may be a run directory's path, its name (``cfn-abc123``) or a prefix of it.
    Prints why and returns 1 when no run is live, 2 when several are and none was named.
    """
    from .bus.shm import check_private_dir, find_runs

    if name is not None and os.sep in name:
        check_private_dir(name)  # raises for another user's, a symlink, a missing one
        return Path(os.path.abspath(name))
    live = [path for path, stale in find_runs(root) if not stale]
    if name is not None:
        matches = [p for p in live if p.name == name] or [p for p in live if p.name.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(p.name for p in live) or "none"
            raise CfnError(f"cfn {command}: no live run {name!r} under {root} (live runs: {known})")
        live = matches
    if not live:
        print(f"cfn {command}: no live run under {root}", file=sys.stderr)
        return 1
    if len(live) > 1:
        print(f"cfn {command}: {len(live)} live runs under {root}; name one:", file=sys.stderr)
        for path in live:
            print(f"  cfn {command} {path.name}", file=sys.stderr)
        return 2
    return live[0]


def read_snapshot(run_dir: Path) -> dict[str, Any] | None:
    """The run's latest snapshot, or None when it has none yet.  Raises :class:`RunGone`."""
    from .bus.shm import run_is_stale

    try:
        fd = os.open(run_dir / "state" / "snapshot", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        raise CfnError(f"cannot read the snapshot of {run_dir}: {exc.strerror}") from None
    data = None
    if fd is not None:
        with open(fd, "rb") as f:
            data = f.read()
    if not run_dir.exists():
        raise RunGone(f"run {run_dir.name} has ended", killed=False)
    if run_is_stale(run_dir):
        raise RunGone(
            f"the coordinator of run {run_dir.name} is no longer running: it was killed or crashed "
            f"(`cfn clean` removes what it left in {run_dir.parent})",
            killed=True,
        )
    if data is None:
        return None
    try:
        snapshot = json.loads(data)
    except ValueError:
        return None  # replaced atomically, so not expected; the next frame reads a whole one
    return snapshot if isinstance(snapshot, dict) else None


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of a local process, from /proc (None when unknown)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------- drawing


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}M"


def sorted_agents(agents: list[dict]) -> list[dict]:
    """Longest-running first (by the elapsed time of their current task), idle agents after, by id."""
    return sorted(agents, key=lambda a: (a.get("elapsed") is None, -(a.get("elapsed") or 0.0), str(a.get("id"))))


def render(snapshot: dict[str, Any] | None, run_dir: Path, *, stall_seconds: float, limit: int | None):
    """One frame of the view (a rich renderable) from a snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if snapshot is None:
        return Text(f"cfn top: run {run_dir.name}: waiting for the coordinator's first snapshot")
    now = time.time()
    age = now - float(snapshot.get("written_at") or now)
    tasks = snapshot.get("tasks") or {}
    agents = sorted_agents(list(snapshot.get("agents") or []))
    stalled = sum(1 for a in agents if a.get("task") is not None and (a.get("quiet") or 0) + age >= stall_seconds)
    head = Text()
    head.append(f"cfn top  run {run_dir.name}", style="bold")
    head.append(f"  coordinator pid {snapshot.get('coordinator_pid')}  round {snapshot.get('round') or '-'}")
    head.append(f"  up {_seconds(now - float(snapshot.get('started_at') or now))}  agents {len(agents)}")
    if age > _OLD_SNAPSHOT:
        head.append(f"  (snapshot {_seconds(age)} old: the coordinator is between rounds or busy)", style="yellow")
    latency = snapshot.get("latency_p50")
    figures = Text(
        f"tasks: {tasks.get('done', 0)} done, {tasks.get('failed', 0)} failed, {tasks.get('retried', 0)} retried, "
        f"{tasks.get('queued', 0)} queued   {snapshot.get('throughput') or 0:.1f} tasks/s   "
        f"p50 {'-' if latency is None else f'{latency * 1000:.1f}ms'}   "
    )
    figures.append(f"stalled {stalled}", style="bold red" if stalled else "")
    figures.append(f" (quiet {stall_seconds:g}s)")

    by_role = snapshot.get("by_role") or {}
    states = [s for s in _STATES if any(s in c for c in by_role.values())] + sorted(
        {s for c in by_role.values() for s in c} - set(_STATES)
    )
    roles = Table(title=None, box=None, pad_edge=False, show_edge=False)
    roles.add_column("role")
    for state in states:
        roles.add_column(state, justify="right")
    for role, counts in sorted(by_role.items()):
        roles.add_row(role, *(str(counts.get(s, 0)) for s in states))

    # hosted agents (docs/HOSTING.md): a host column, and no rss of their own (the host's
    # memory is shared by its thousands of agents; its pid is in the pid column)
    hosted = any(a.get("host") for a in agents)
    columns = [
        ("agent", "left"), ("role", "left"), ("state", "left"), ("task", "left"), ("elapsed", "right"),
        ("status", "left"), ("in", "right"), ("out", "right"), ("rss", "right"), ("pid", "right"),
    ] + ([("host", "left")] if hosted else [])
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    widest_host = max((len(str(a.get("host") or "")) for a in agents), default=0)
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "status", overflow="ellipsis",
                         min_width=widest_host if name == "host" else None)  # a host id cut short names none
    shown = agents if limit is None else agents[: max(0, limit)]
    for a in shown:
        is_stalled = a.get("task") is not None and (a.get("quiet") or 0) + age >= stall_seconds
        elapsed = a.get("elapsed")
        host = a.get("host")
        row = [
            str(a.get("id")),
            str(a.get("role")),
            Text("STALLED", style="bold red") if is_stalled else Text(str(a.get("state")), style="green" if a.get("state") == "busy" else ""),
            str(a.get("task") or "-"),
            _seconds(None if elapsed is None else elapsed + age),
            str(a.get("status") or ""),
            str(a.get("messages_in", 0)),
            str(a.get("messages_out", 0)),
            "-" if host else _mib(rss_bytes(a.get("pid"))),
            str(a.get("pid") or "-"),
        ]
        if hosted:
            row.append(str(host or "-"))
        table.add_row(*row)
    parts = [head, figures, Text(""), roles, Text(""), table]
    if len(shown) < len(agents):
        parts.append(Text(f"... and {len(agents) - len(shown)} more agents (sorted by longest-running task)", style="dim"))
    return Group(*parts)


# ---------------------------------------------------------------------- the commands


def cmd_top(args) -> int:
    """``cfn top [RUN]``: exit 0 when the run ends (or with --once), 1 when its coordinator died."""
    from rich.console import Console

    root = _root(args)
    run_dir = choose_run(args.run, root, "top")
    if isinstance(run_dir, int):
        return run_dir
    interactive = sys.stdout.isatty() and not args.once
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(width=width, highlight=False, force_terminal=None if interactive else False)
    stall = args.stall_seconds if args.stall_seconds is not None else STALL_SECONDS

    def frame(limit):
        return render(read_snapshot(run_dir), run_dir, stall_seconds=stall, limit=limit)

    try:
        if args.once or not interactive:  # plain frames, one per interval (or just one), for pipes and logs
            while True:
                console.print(frame(args.limit))
                if args.once:
                    return 0
                time.sleep(args.interval)
                console.print()
        from rich.live import Live

        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while True:
                live.update(frame(args.limit or max(3, console.size.height - 9)), refresh=True)
                time.sleep(args.interval)
    except RunGone as gone:
        print(f"cfn top: {gone}", file=sys.stderr)
        return 1 if gone.killed else 0
    except KeyboardInterrupt:
        return 0


def find_live_run(args, command: str) -> Path | int:
    """The run ``cfn <command> [RUN]`` acts on, found like ``cfn clean`` finds runs.

    Returns its directory, or the exit status :func:`choose_run` decided (none, several).
    :raises RunGone: the run has ended or its coordinator is gone.
    """
    run_dir = choose_run(args.run, _root(args), command)
    if not isinstance(run_dir, int):
        read_snapshot(run_dir)  # raises when the run has ended or its coordinator is gone
    return run_dir


def cmd_stop(args) -> int:
    """``cfn stop [RUN]``: ask the run's coordinator to stop, wait for the run to end."""
    try:
        run_dir = find_live_run(args, "stop")
    except RunGone as gone:
        print(f"cfn stop: {gone}", file=sys.stderr)
        return 1
    if isinstance(run_dir, int):
        return run_dir
    state = run_dir / "state"
    tmp = state / f".stop.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(json.dumps({"pid": os.getpid(), "at": time.time()}).encode())
        os.replace(tmp, state / "stop")
    except FileNotFoundError:
        print(f"cfn stop: run {run_dir.name} has ended", file=sys.stderr)
        return 0
    except OSError as exc:
        raise CfnError(f"cfn stop: cannot write the stop request in {state}: {exc.strerror}") from None
    print(f"cfn stop: asked run {run_dir.name} to stop", file=sys.stderr)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if not run_dir.exists():
            print(f"cfn stop: run {run_dir.name} has stopped", file=sys.stderr)
            return 0
        time.sleep(0.1)  # polling a directory another process removes: nothing to wait on
    print(f"cfn stop: run {run_dir.name} is still running after {args.wait:g}s", file=sys.stderr)
    return 1


def add_commands(sub) -> None:
    """The ``top`` and ``stop`` subcommands of ``cfn``."""
    top = sub.add_parser("top", help="live view of a running coordination (from another terminal)")
    stop = sub.add_parser("stop", help="end a running coordination (its `cfn run` exits 143)")
    for p in (top, stop):
        p.add_argument("run", nargs="?", help="run directory, its name (cfn-...) or a prefix (default: the only live run)")
        p.add_argument("--root", help="bus root (default: [bus] root of the configuration, else /dev/shm)")
        p.add_argument("--config", metavar="PATH", help="cfn.toml whose [bus] root to look in (default: found upward)")
    top.add_argument("--once", action="store_true", help="print one plain frame and exit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between frames (default 1)")
    top.add_argument("--limit", type=int, metavar="N", help="agents shown (default: what fits; all with --once)")
    top.add_argument(
        "--stall-seconds", type=float, metavar="SECONDS",
        help=f"mark a busy agent stalled after this long without progress (default {STALL_SECONDS:g})",
    )
    top.set_defaults(func=cmd_top)
    stop.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the run to end (default 60)")
    stop.set_defaults(func=cmd_stop)
