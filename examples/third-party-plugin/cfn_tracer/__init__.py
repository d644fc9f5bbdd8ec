"""cfn-tracer: write every message a cfn process sends to a JSONL trace.

Enable it with ``plugins = ["tracer"]`` in cfn.toml; choose the file with::

    [tracer]
    path = "cfn-trace.jsonl"     # or CFN_TRACER_PATH=/tmp/trace.jsonl

Hook implementations:

* ``cfn_settings`` declares the ``[tracer]`` table (validated, documented, and
  settable from the environment by cfn itself).
* ``cfn_configure`` checks that the trace's directory exists, so a typo fails
  at start with the key's name instead of in 500 agents.
* ``cfn_send`` is a *wrapper* (``wrapper=True``): it does not replace the send
  step (whichever plugin or the baseline does that still runs), it observes it.
  It runs on both sides: the coordinator and every agent append to the same file.
* ``cfn_report`` adds ``tracer: path=..., records=N`` to the summary.

Each line is one message handed to ``cfn_send``: ``run`` (the bus run it belongs
to: one file can hold several runs), ``side``, ``pid``, ``id``, ``src``, ``dst``,
``kind``, ``round``, ``task``, ``ok`` (false if the send raised) and ``send_ms``
(how long the send call took; with a buffering plugin such as cfn-batch that is
the time to accept, not to deliver).  Lines are appended with one ``write`` per
send call on a file opened with ``O_APPEND``, so lines from different processes
never interleave.  The file is opened and closed around each write: a plugin
must not leave a file descriptor open after the coordinator is done (cfn's
``no_leaks`` fixture checks), and a send can happen as late as the last stop
message of the session.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from attrs import define

from cfn_core import ConfigError, hookimpl, setting

__version__ = "0.1.0"


@define(frozen=True)
class TracerSettings:
    """``[tracer]``: where cfn-tracer writes its JSONL trace."""

    path: str = setting("cfn-trace.jsonl", "JSONL file every process appends its sent messages to (relative: to the working directory)")
    bodies: bool = setting(False, "also write each message's body (can be large)")


@hookimpl
def cfn_settings():
    return {"tracer": TracerSettings}


@hookimpl
def cfn_configure(config):
    # called only when the plugin is enabled; cfn validates the [tracer] table either way
    parent = Path(config.section("tracer").path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"[tracer] path = {config.section('tracer').path!r}: directory {str(parent)!r} does not exist")


def _run_name(ctx) -> str:
    return os.path.basename(str(ctx.run_ref or ""))


@hookimpl(wrapper=True)
def cfn_send(ctx, messages):
    t0 = time.perf_counter()
    ok = False
    try:
        result = yield  # the real send (a plugin's or the baseline's)
        ok = True
        return result
    finally:
        _write(ctx, messages, ok, time.perf_counter() - t0)


def _write(ctx, messages, ok: bool, seconds: float) -> None:
    if not messages:
        return
    run = _run_name(ctx)
    with_bodies = ctx.config.section("tracer").bodies
    lines = []
    for m in messages:
        record = {
            "run": run,
            "side": ctx.side,
            "pid": os.getpid(),
            "id": m.id,
            "src": m.src,
            "dst": m.dst,
            "kind": m.kind,
            "round": m.round,
            "task": m.task,
            "ok": ok,
            "send_ms": round(seconds * 1000, 3),
        }
        if with_bodies:
            record["body"] = m.body
        lines.append(json.dumps(record, default=str))
    path = os.path.expanduser(ctx.config.section("tracer").path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


@hookimpl
def cfn_report(ctx):
    path = os.path.expanduser(ctx.config.section("tracer").path)
    run = _run_name(ctx)
    records = 0
    try:
        with open(path, encoding="utf-8") as f:
            records = sum(1 for line in f if f'"run": "{run}"' in line)
    except OSError:
        pass
    return {"tracer": {"path": path, "records": records}}
