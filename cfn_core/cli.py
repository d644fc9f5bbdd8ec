"""The ``cfn`` command.

Exit codes (docs/USER_GUIDE.md): 0 all delivered, 1 some task failed or was
lost, 2 usage or configuration error, nothing was started (one line, no
traceback), 3 the run started and stopped on an error (the bus filled, an inbox
stayed full, a plugin failed under --strict): the summary or JSON of what ran,
with the cause, 4 a budget stopped starting tasks (the only failures are tasks
not started: docs/LLM_SWARMS.md), 130 interrupted (SIGINT), 143 terminated
(SIGTERM, or `cfn stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from .errors import CfnError

#: the run started, then stopped on an error (see the module docstring)
EXIT_STOPPED = 3

# command-line flag -> config key (every other key: --set table.key=value)
RUN_FLAGS = {
    "agents": ("workload.agents", "agents per coordination"),
    "rounds": ("workload.rounds", "rounds in a row (later rounds show reuse)"),
    "tasks": ("workload.tasks", "tasks per round (0: one per agent)"),
    "topology": ("workload.topology", "star or mesh"),
    "messages_per_agent": ("workload.messages_per_agent", "peer messages per agent (mesh)"),
    "handler": ("workload.handler", "module:function run per task"),
    "command": ("workload.command", "shell command run per task"),
    "payload_bytes": ("workload.payload_bytes", "payload size per task"),
    "timeout": ("workload.timeout", "seconds per task before its agent is killed"),
    "metrics_port": ("run.metrics_port", "serve /metrics on this port during the run"),
    "metrics_file": ("run.metrics_file", "write metrics in Prometheus text format here"),
}

#: metavars of flags whose value is not named by the flag's first word
_METAVARS = {"metrics_port": "PORT", "metrics_file": "PATH", "messages_per_agent": "N", "payload_bytes": "BYTES", "timeout": "SECONDS"}


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived.  A KeyboardInterrupt, so every cleanup path treats it like Ctrl-C
    (and no ``except Exception`` in a plugin or handler can swallow it)."""


def _on_signal(signum, frame):
    # Only the first signal interrupts; later ones are ignored so that the shutdown it
    # starts (bounded by [run] shutdown_timeout, then SIGKILL) removes every agent and
    # the run directory instead of being cut short half way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _overrides(args) -> dict:
    out = {}
    for name, (key, _help) in RUN_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            out[key] = value
    if getattr(args, "plugins", None) is not None:
        out["plugins"] = args.plugins
    if getattr(args, "strict", False):
        out["run.strict"] = "true"
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise CfnError(f"--set {item!r}: use TABLE.KEY=VALUE, e.g. --set pool.size=50")
        out[key.strip()] = value
    return out


def _load(args):
    from .config import load_config

    return load_config(args.config, overrides=_overrides(args))


class _Progress:
    """A live line on stderr when it is a terminal; nothing otherwise.

    During the spawn it shows agents started and ready as they happen, with the rate
    agents become ready and the time left at that rate (the coordinator reports
    ``started`` and ``spawn`` counts on every launch and every ready message).
    """

    #: seconds between two redraws (a launch can be reported thousands of times a second)
    INTERVAL = 0.1

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.last = ""
        self.last_at = 0.0
        self.started = 0
        self.spawn_t0: float | None = None

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
            line = f"{phase:<10} {self._bar(done, total)} {done}/{total}"
        finished = total and done >= total
        if line == self.last or (now - self.last_at < self.INTERVAL and not finished and phase == self._phase_of(self.last)):
            return
        # pad over the rest of a longer previous line
        self.stream.write("\r" + line + " " * max(0, len(self.last) - len(line)))
        self.stream.flush()
        self.last, self.last_at = line, now

    @staticmethod
    def _phase_of(line: str) -> str:
        return line.split(" ", 1)[0]

    @staticmethod
    def _bar(done: int, total: int, width: int = 30) -> str:
        filled = min(width, int(width * done / total)) if total else 0
        return f"[{'#' * filled}{'.' * (width - filled)}]"

    def _spawn_line(self, ready: int, total: int, now: float) -> str:
        elapsed = now - (self.spawn_t0 or now)
        rate = ready / elapsed if elapsed > 0 else 0.0
        head = f"{'spawn':<10} {self._bar(ready, total)} {ready}/{total} ready" if total else f"{'spawn':<10} {ready} ready"
        line = f"{head}, {max(self.started, ready)} started"
        if rate > 0:
            line += f", {rate:.1f}/s"
            if total and ready < total:
                line += f", ETA {_duration((total - ready) / rate)}"
        return line

    def done(self) -> None:
        if self.enabled and self.last:
            self.stream.write("\r" + " " * len(self.last) + "\r")
            self.stream.flush()


def _duration(seconds: float) -> str:
    """'45 s', '2 min 05 s', '1 h 03 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _StdoutForJson:
    """Keep stdout for the JSON document alone while ``cfn run --json`` runs.

    A plugin or handler that prints (in this process, or in a process it starts, which
    inherits the descriptor) would otherwise corrupt the document: during the run file
    descriptor 1 points at stderr, and the document is written to the real stdout after.
    """

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)
        return self

    def __exit__(self, *exc) -> None:
        try:
            sys.stdout.flush()  # what was printed during the run goes to stderr, not the document
        except OSError:
            pass
        os.dup2(self.saved, 1)
        os.close(self.saved)


def cmd_run(args) -> int:
    from .coordinator import Coordinator
    from .live import StopRequested
    from .report import render_summary

    if args.events == "-" and args.json:
        raise CfnError("--events - and --json both write to stdout: give --events a file, e.g. --events events.jsonl")
    config = _load(args)
    progress = _Progress()
    # events on stdout: written to the real stdout, kept apart like --json's document (see _StdoutForJson)
    events_stream = os.fdopen(os.dup(1), "wb") if args.events == "-" else None
    try:
        coord = Coordinator(config, progress=progress, events=events_stream or args.events)
    except BaseException:
        if events_stream is not None:
            events_stream.close()
        raise
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = None
    asked_to_stop = False
    stopped: CfnError | None = None
    stdout_guard = _StdoutForJson().__enter__() if args.json or events_stream is not None else None
    try:
        with coord:
            result = coord.run()
        code = result.exit_code
    except StopRequested:
        code, asked_to_stop = 143, True
    except Terminated:
        code = 143
    except KeyboardInterrupt:
        code = 130
    except CfnError as exc:
        if coord.partial is None:
            raise  # nothing was started: one line, exit 2
        stopped, code = exc, EXIT_STOPPED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.done()
        if stdout_guard is not None:
            stdout_guard.__exit__(None, None, None)
        if events_stream is not None:
            events_stream.close()
    result = coord.partial
    if result is None:
        return code
    if code in (130, 143):
        result.interrupted = True
    if stopped is not None:
        result.error = str(stopped)
    result.open_seconds, result.close_seconds = coord.open_seconds, coord.close_seconds
    if args.json:
        out = result.to_dict(with_tasks=args.results)
        out["exit_code"] = code
        print(json.dumps(out, indent=2, default=str))
    else:  # with the events on stdout, the summary goes to stderr
        print(render_summary(result), file=sys.stderr if events_stream is not None else sys.stdout)
    if stopped is not None:
        print(f"cfn: error: {stopped}", file=sys.stderr)
    if asked_to_stop:
        print("cfn: stopped by `cfn stop`", file=sys.stderr)
    return code


def cmd_init(args) -> int:
    from .config import CONFIG_NAME, render_default_toml

    path = Path(args.path or CONFIG_NAME)
    if path.exists() and not args.force:
        raise CfnError(f"{path} already exists; use --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_default_toml())
    except OSError as exc:
        raise CfnError(f"cannot write {path}: {exc.strerror}") from None
    print(f"wrote {path}")
    return 0


def cmd_plugins(args) -> int:
    from .plugins import describe_plugins

    rows = describe_plugins(_load(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row.get("version") else ""
        print(f"{row['name']:<10} {row['status']:<9} {row.get('distribution') or '?'}{version}  ({row['module']})")
        for hook, order in sorted(row["call_order"].items()):
            print(f"    {hook:<22} call order: {' > '.join(order)}")
        if not row["call_order"] and row["hooks"]:  # not enabled: what it would implement
            print(f"    hooks: {', '.join(row['hooks'])} (enable it to see the call order)")
        if row.get("error"):
            print(f"    error: {row['error']}")
    return 0


def cmd_clean(args) -> int:
    from .bus.shm import find_runs, remove_tree

    root, where = args.root, "--root"
    if root is None:  # the root runs are created in: [bus] root of cfn.toml / CFN_BUS_ROOT
        from .config import load_config

        root, where = load_config(args.config).bus.root or None, "[bus] root"
    if root is not None and not os.path.isdir(root):
        # "0 stale runs removed" would hide a typo in the very path meant to be cleaned
        raise CfnError(f"{where} {root}: no such directory")
    removed = kept = 0
    for path, stale in find_runs(root):
        if stale:
            if not args.dry_run:
                remove_tree(path)
            print(f"{'would remove' if args.dry_run else 'removed'} {path}")
            removed += 1
        else:
            kept += 1
    print(f"{removed} stale run(s) {'found' if args.dry_run else 'removed'}, {kept} live run(s) kept")
    return 0


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("cfn-core")
    except md.PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (like every other cfn error), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


#: subcommands defined in this module: ``cfn run`` and these do not need the plugins' commands
_KERNEL_COMMANDS = frozenset({"run", "init", "plugins", "clean", "top", "stop"})


def build_parser(plugin_commands: bool = True) -> argparse.ArgumentParser:
    """The ``cfn`` parser; ``plugin_commands=False`` leaves out ``cfn bench`` and the plugins' commands.

    Adding those imports every installed plugin (a distributed bus's client library
    among them): ~0.1 s of every ``cfn run``, which needs none of them.
    """
    parser = _Parser(prog="cfn", description="coordinate agent processes over a lossless message bus")
    parser.add_argument("--version", action="version", version=f"cfn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", metavar="PATH", help="cfn.toml or pyproject.toml (default: found upward from here)")
        p.add_argument("--plugins", metavar="A,B", help="replace the plugin list, e.g. pool,batch ('' for the baseline)")
        p.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE", help="override any setting (repeatable)")
        p.add_argument("--strict", action="store_true", help="a failing plugin stops the run instead of falling back")

    run = sub.add_parser("run", help="run one coordination (rounds times) and print the summary")
    with_config(run)
    for name, (key, help_) in RUN_FLAGS.items():
        metavar = _METAVARS.get(name, name.split("_")[0].upper())
        run.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar, help=f"{help_} ({key})")
    run.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    run.add_argument("--results", action="store_true", help="include every task's result in --json")
    run.add_argument("--events", metavar="FILE", help="write the event log (JSON Lines, docs/EVENTS.md) here; '-': stdout")
    run.set_defaults(func=cmd_run)

    init = sub.add_parser("init", help="write a commented default cfn.toml")
    init.add_argument("path", nargs="?", help="where (default ./cfn.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    plugins = sub.add_parser("plugins", help="list installed plugins, their hooks and call order")
    with_config(plugins)
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    clean = sub.add_parser("clean", help="remove run directories left by coordinators that died")
    clean.add_argument("--root", help="bus root (default: [bus] root of the configuration, else /dev/shm)")
    clean.add_argument("--config", metavar="PATH", help="cfn.toml whose [bus] root to clean (default: found upward)")
    clean.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    clean.set_defaults(func=cmd_clean)

    # `cfn top` and `cfn stop`: watch or end a run from another terminal (rich is loaded only by them)
    from .top import add_commands as add_watch_commands

    add_watch_commands(sub)

    if plugin_commands:
        # `cfn bench` and the commands of installed plugins (`cfn agent` of a distributed bus)
        from .plugins import add_plugin_commands

        add_plugin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["msg"]:  # a command agent's messaging call: the standard library only, fast
        from .msg import main as msg_main

        return msg_main(words[1:])
    command = next((w for w in words if not w.startswith("-")), None)
    # `cfn --help` and any other command list (or are) the plugins' commands too
    parser = build_parser(plugin_commands=command not in _KERNEL_COMMANDS)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CfnError as exc:
        print(f"cfn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1
