"""The ``cfn`` command.

Exit codes (docs/USER_GUIDE.md): 0 all delivered, 1 some task failed or was
lost, 2 usage or configuration error, nothing was started (one line, no
traceback), 3 the run started and stopped on an error (the bus filled, an inbox
stayed full, a plugin failed under --strict): the summary or JSON of what ran,
with the cause, 4 a budget stopped starting tasks (the only failures are tasks
not started: docs/LLM_SWARMS.md), 129 hung up (SIGHUP: its terminal closed),
130 interrupted (SIGINT), 143 terminated (SIGTERM, or `cfn stop`).
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
    """SIGTERM or SIGHUP arrived.  A KeyboardInterrupt, so every cleanup path treats it like
    Ctrl-C (and no ``except Exception`` in a plugin or handler can swallow it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


#: what stops a run cleanly: Ctrl-C, SIGTERM, and SIGHUP (its terminal was closed: without
#: a handler the process died at once and left its run directory behind)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum, frame):
    # Only the first signal interrupts; later ones are ignored so that the shutdown it
    # starts (bounded by [run] shutdown_timeout, then SIGKILL) removes every agent and
    # the run directory instead of being cut short half way.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


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

    if args.events == "-" and args.json:
        raise CfnError("--events - and --json both write to stdout: give --events a file, e.g. --events events.jsonl")
    from .run_view import RunView

    config = _load(args)
    progress = RunView()  # the compact live view on a terminal; nothing otherwise
    # events on stdout: written to the real stdout, kept apart like --json's document (see _StdoutForJson)
    events_stream = os.fdopen(os.dup(1), "wb") if args.events == "-" else None
    try:
        coord = Coordinator(config, progress=progress, events=events_stream or args.events)
    except BaseException:
        if events_stream is not None:
            events_stream.close()
        raise
    progress.attach(lambda: coord.ctx.live.last if coord.ctx is not None else None)
    # a signal the caller ignores stays ignored (`nohup cfn run`, a background job's SIGINT)
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    code = None
    asked_to_stop = False
    stopped: CfnError | None = None
    stdout_guard = _StdoutForJson().__enter__() if args.json or events_stream is not None else None
    try:
        with coord:
            result = coord.run_workflow() if config.tasks else coord.run()  # [[tasks]]: a task graph
        code = result.exit_code
    except StopRequested:
        code, asked_to_stop = 143, True
    except Terminated as signalled:
        code = 128 + signalled.signum  # 143 for SIGTERM, 129 for SIGHUP
    except KeyboardInterrupt:
        code = 130
    except CfnError as exc:
        if coord.partial is None:
            raise  # nothing was started: one line, exit 2
        stopped, code = exc, EXIT_STOPPED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            progress.done()
        except OSError:  # the terminal is gone (SIGHUP): nothing to remove the view from
            pass
        if stdout_guard is not None:
            stdout_guard.__exit__(None, None, None)
        if events_stream is not None:
            events_stream.close()
    result = coord.partial
    if result is None:
        return code
    if code in (129, 130, 143):
        result.interrupted = True
    if stopped is not None:
        result.error = str(stopped)
    result.open_seconds, result.close_seconds = coord.open_seconds, coord.close_seconds
    try:
        _print_outcome(args, result, code, events_stream is not None, stopped, asked_to_stop)
    except OSError:  # stdout or stderr went with the terminal (SIGHUP): the run has ended all the same
        pass
    return code


def _print_outcome(args, result, code: int, events_on_stdout: bool, stopped, asked_to_stop: bool) -> None:
    from .report import render_summary

    if args.json:
        out = result.to_dict(with_tasks=args.results)
        out["exit_code"] = code
        print(json.dumps(out, indent=2, default=str))
    else:  # with the events on stdout, the summary goes to stderr
        print(render_summary(result), file=sys.stderr if events_on_stdout else sys.stdout)
    if stopped is not None:
        print(f"cfn: error: {stopped}", file=sys.stderr)
    if asked_to_stop:
        print("cfn: stopped by `cfn stop`", file=sys.stderr)


def cmd_cancel(args) -> int:
    """``cfn cancel RUN TASK``: cancel one task of a run fed with ``submit`` or ``[[tasks]]``.

    Found like ``cfn stop`` finds a run.  The request is a file of its own in the run's
    ``state/cancel/`` (so concurrent requests cannot overwrite each other), kept open here:
    the coordinator appends its answer to that file (cfn_core.feed, ``_cancel_requests``),
    which this process reads even if the run ends, and its directory goes, right after.
    """
    from .feed import CANCEL_DIR
    from .top import RunGone, find_live_run

    try:
        run_dir = find_live_run(args, "cancel")
    except RunGone as gone:
        raise CfnError(f"cfn cancel: {gone}") from None
    if isinstance(run_dir, int):
        return run_dir
    directory = run_dir / "state" / CANCEL_DIR
    name = f"{os.getpid()}-{time.time_ns()}"
    tmp, path = directory / f".{name}.tmp", directory / f"{name}.request"
    try:
        try:
            os.mkdir(directory, 0o700)  # not makedirs: a run that has ended must not be re-created
        except FileExistsError:
            pass
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise CfnError(f"cfn cancel: run {run_dir.name} has ended") from None
    except OSError as exc:
        raise CfnError(f"cfn cancel: cannot write the cancel request in {directory}: {exc.strerror}") from None
    try:
        try:
            os.write(fd, json.dumps({"task": args.task}).encode() + b"\n")
            os.rename(tmp, path)  # whole, or not there: the coordinator never reads half a request
        except OSError as exc:
            _remove(tmp)
            raise CfnError(f"cfn cancel: cannot write the cancel request in {directory}: {exc.strerror}") from None
        outcome = _wait_for_cancel_answer(fd, run_dir, args.wait)
    finally:
        os.close(fd)
    if outcome is None:
        _remove(path)  # not to take effect after this command said it did not
        raise CfnError(
            f"cfn cancel: run {run_dir.name} did not answer within {args.wait:g}s "
            "(only a run fed with Coordinator.submit or [[tasks]] can cancel a task)"
        )
    if outcome == "gone":
        raise CfnError(f"cfn cancel: run {run_dir.name} ended before it answered")
    if outcome == "unknown":
        raise CfnError(f"cfn cancel: run {run_dir.name} has no task {args.task!r}")
    if outcome in ("finished", "ended"):
        why = "had already finished" if outcome == "finished" else "did not finish: the run ended"
        print(f"cfn cancel: task {args.task} of run {run_dir.name} {why}; nothing to cancel", file=sys.stderr)
        return 1
    if outcome != "cancelled":
        raise CfnError(f"cfn cancel: run {run_dir.name} answered {outcome!r}")
    print(f"cfn cancel: cancelled task {args.task} of run {run_dir.name}", file=sys.stderr)
    return 0


def _wait_for_cancel_answer(fd: int, run_dir, wait: float) -> str | None:
    """The outcome the coordinator appended to the request file ``fd``; "gone" if the run
    ended without answering; None if it did not answer within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        gone = not run_dir.exists()  # looked at before the answer: one written before it ended is read
        answer_line = os.pread(fd, 65536, 0).partition(b"\n")[2].lstrip(b"\n")  # after the request
        if answer_line.endswith(b"\n"):  # whole: the coordinator ends its answer with a newline
            try:
                answer = json.loads(answer_line)
            except ValueError:
                answer = None
            return str(answer.get("outcome")) if isinstance(answer, dict) else "invalid"
        if gone:
            return "gone"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)  # polling a file another process writes: nothing to wait on


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
_KERNEL_COMMANDS = frozenset({"run", "init", "plugins", "clean", "top", "stop", "cancel"})


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

    cancel = sub.add_parser("cancel", help="cancel one task of a running coordination fed with submit or [[tasks]]")
    cancel.add_argument("run", help="run directory, its name (cfn-...) or a prefix")
    cancel.add_argument("task", help="the task id (a [[tasks]] id, or a submitted task's future.task_id)")
    cancel.add_argument("--root", help="bus root (default: [bus] root of the configuration, else /dev/shm)")
    cancel.add_argument("--config", metavar="PATH", help="cfn.toml whose [bus] root to look in (default: found upward)")
    cancel.add_argument("--wait", type=float, default=30.0, metavar="SECONDS", help="how long to wait for the run's answer (default 30)")
    cancel.set_defaults(func=cmd_cancel)

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
