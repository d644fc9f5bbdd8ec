"""Whole process, cold: ``cfn run`` against the scripts a user would write instead, and the fork floor.

    python -m cfn_core.bench.whole_process --agents 100,500 --repeat 3 [--json out.json]
        [--cfn-python main=/path/to/other/venv/bin/python]

For every N, five arms each run as a fresh interpreter, timed from the
subprocess's start to its exit (interpreter start, imports, N agents or process
starts, one echo task each, shutdown):

- ``cfn``: ``cfn run --agents N --plugins pool,parallel --set pool.size=N --strict --json --results``:
  N process agents forked from the pool's zygote, the like of the stdlib scripts' N processes;
- ``cfn-hosted``: ``cfn run --agents N --plugins '' --set workload.host=async --strict --json --results``:
  the same N agents hosted as asyncio tasks in one host process per core (docs/HOSTING.md),
  what cfn offers for agents that wait rather than compute; not an equivalent of N
  processes (one crash takes a host's agents along), so reported beside them, never
  in their place;
- ``processpool``: a stand-alone ``ProcessPoolExecutor(max_workers=N)`` script, N tasks;
- ``mp-pipes``: a stand-alone script of N ``multiprocessing.Process`` with a ``Pipe`` each;
- ``floor``: a stand-alone script that ``os.fork()``s N children, each echoing one pipe message;
- ``cfn@LABEL`` (one per ``--cfn-python LABEL=PYTHON``): the ``cfn`` arm run by another
  interpreter, e.g. the venv of a git worktree of another commit, so that two checkouts
  are compared side by side in one run.

The arms alternate within each repetition (and the first arm rotates between
repetitions), so a machine whose speed drifts affects all of them alike: the
figures to read are the ratios of one run, to the floor and to the best
standard-library peer.  Every run's CPU time (user + system of the arm's whole
process tree, all of it reaped by the time the arm exits) is recorded too: on a
machine shared with other work it varies much less than the wall time.  Every
arm checks its N echoes; an arm that did not get all of them back counts as
failed and the command exits 1.

The stand-alone scripts use only the standard library (importing cfn would
charge its import time to them); the stdlib ones ask for the ``fork`` start
method, the default on Linux before Python 3.14 and the fastest, and the only
one a ``python -c`` script works with (spawn re-imports the main module).
This is a benchmark, not a test: nothing here asserts a time.

Before the first arm, cfn's own modules (the kernel's and every installed cfn
plugin's packages) are byte-compiled for each cfn interpreter, as ``pip install``
does for a regular (non-editable) install.  The stdlib arms import only modules
that ship compiled; an editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (set
on these machines) would otherwise compile ~50 cfn modules from source in the
coordinator and again in the pool's zygote on every start (measured: 0.07 s of
the 0.45 s CPU of a one-agent ``cfn run``), charging cfn for something no
installed cfn does.  ``--no-compile`` measures that case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ARMS = ("cfn", "cfn-hosted", "processpool", "mp-pipes", "floor")
STDLIB = ("processpool", "mp-pipes")

PROCESSPOOL_SCRIPT = r"""
import json, multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor

def echo(payload):
    return payload

if __name__ == "__main__":
    agents, payload = int(sys.argv[1]), "x" * int(sys.argv[2])
    with ProcessPoolExecutor(max_workers=agents, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(echo, payload) for _ in range(agents)]
        echoed = sum(f.result() == payload for f in futures)
    print(json.dumps({"agents": agents, "echoed": echoed}))
"""

MP_PIPES_SCRIPT = r"""
import json, multiprocessing, sys

def worker(conn):
    conn.send(conn.recv())
    conn.close()

if __name__ == "__main__":
    agents, payload = int(sys.argv[1]), "x" * int(sys.argv[2])
    ctx = multiprocessing.get_context("fork")
    procs, conns = [], []
    for _ in range(agents):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child,))
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    for conn in conns:
        conn.send(payload)
    echoed = sum(conn.recv() == payload for conn in conns)
    for proc in procs:
        proc.join()
    print(json.dumps({"agents": agents, "echoed": echoed}))
"""

# the same as cfn_core.bench.references.fork_floor, without importing cfn
FLOOR_SCRIPT = r"""
import json, os, sys

def read_exactly(fd, size):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

agents, body = int(sys.argv[1]), b"x" * int(sys.argv[2])
message = len(body).to_bytes(4, "big") + body  # length-prefixed: later children hold the write ends
children, ends = [], []
for _ in range(agents):
    inbox, to_child = os.pipe()
    from_child, outbox = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            head = read_exactly(inbox, 4)
            write_all(outbox, head + read_exactly(inbox, int.from_bytes(head, "big")))
            code = 0
        finally:
            os._exit(code)
    os.close(inbox)
    os.close(outbox)
    children.append(pid)
    ends.append((to_child, from_child))
for to_child, _ in ends:
    write_all(to_child, message)
echoed = sum(read_exactly(from_child, len(message)) == message for _, from_child in ends)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"agents": agents, "echoed": echoed}))
"""

SCRIPTS = {"processpool": PROCESSPOOL_SCRIPT, "mp-pipes": MP_PIPES_SCRIPT, "floor": FLOOR_SCRIPT}


def arm_label(arm: str, plugins: str) -> str:
    """What the table calls an arm."""
    if arm.startswith("cfn@"):
        return arm_label("cfn", plugins) + f" [{arm[4:]}]"
    if arm == "cfn":
        size = ", pool.size=N" if "pool" in plugins.split(",") else ""
        return f"cfn run ({plugins or 'baseline'}{size})"
    if arm == "cfn-hosted":
        return "cfn run (hosted: workload.host=async)"
    return {
        "processpool": "ProcessPoolExecutor script",
        "mp-pipes": "multiprocessing.Process + Pipe script",
        "floor": "fork floor script (os.fork + pipe)",
    }[arm]


def arm_command(arm: str, agents: int, payload_bytes: int, plugins: str, settings: list[str],
                python: str | None = None) -> list[str]:
    """The command line of one arm: a fresh interpreter each time (``python``: another one, for ``cfn@LABEL``)."""
    if not is_cfn(arm):
        return [sys.executable, "-c", SCRIPTS[arm], str(agents), str(payload_bytes)]
    hosted = arm == "cfn-hosted"
    cmd = [python or sys.executable, "-m", "cfn_core", "run", "--agents", str(agents), "--plugins", "" if hosted else plugins,
           "--topology", "star", "--rounds", "1", "--tasks", "0", "--handler", "cfn_core.handlers:echo",
           "--payload-bytes", str(payload_bytes), "--strict", "--json", "--results"]
    if hosted:
        cmd += ["--set", "workload.host=async"]
    elif "pool" in plugins.split(","):
        cmd += ["--set", f"pool.size={agents}"]
    for item in settings:
        cmd += ["--set", item]
    return cmd


def is_cfn(arm: str) -> bool:
    """``cfn``, ``cfn-hosted`` and the ``cfn@LABEL`` arms of other interpreters."""
    return arm in ("cfn", "cfn-hosted") or arm.startswith("cfn@")


def _last_json_line(text: str):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def check_output(arm: str, agents: int, payload_bytes: int, returncode: int, stdout: str, stderr: str) -> dict:
    """Did the arm echo all N payloads? ``{"ok", "echoed", "error"}`` plus, for cfn, its own timings."""
    out: dict = {"ok": False, "echoed": 0, "error": None}
    if is_cfn(arm):
        try:
            data = json.loads(stdout)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            out["error"] = f"exit {returncode}, no JSON on stdout: {stderr.strip()[-300:]}"
            return out
        payload = "x" * payload_bytes
        values = [r.get("value") for rnd in data.get("rounds", []) for r in (rnd.get("results") or {}).values()]
        out["echoed"] = sum(v == payload for v in values)
        out["cfn"] = {k: data.get(k) for k in ("seconds", "open_seconds", "close_seconds", "total_seconds", "delivery_rate")}
        problems = []
        if returncode != 0 or not data.get("ok"):
            problems.append(f"exit {returncode}, ok={data.get('ok')}, error={data.get('error')}")
        if data.get("fallbacks"):
            problems.append(f"plugin fallbacks: {data['fallbacks']}")
        if problems:
            out["error"] = "; ".join(problems)
    else:
        data = _last_json_line(stdout)
        out["echoed"] = data.get("echoed", 0) if isinstance(data, dict) else 0
        if returncode != 0:
            out["error"] = f"exit {returncode}: {stderr.strip()[-300:]}"
    if out["error"] is None and out["echoed"] != agents:
        out["error"] = f"{out['echoed']} of {agents} echoes came back"
    out["ok"] = out["error"] is None
    return out


#: run by each cfn interpreter: byte-compile the packages of cfn_core and of every installed cfn plugin
COMPILE_SCRIPT = r"""
import compileall, importlib, os, sys
import cfn_core
from cfn_core.plugins import installed
dirs = {os.path.dirname(cfn_core.__file__)}
for ep in installed().values():
    top = importlib.import_module(ep.module.split(".")[0])
    dirs.add(os.path.dirname(top.__file__))
ok = all(compileall.compile_dir(d, quiet=1) for d in sorted(dirs))
print(len(dirs))
sys.exit(0 if ok else 1)
"""


def compile_cfn(python: str) -> int:
    """Byte-compile cfn's packages for ``python`` (see the module docstring); returns how many."""
    proc = subprocess.run([python, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"whole_process: cannot byte-compile cfn's modules for {python}: {proc.stderr.strip()[-500:]}")
    return int(proc.stdout.strip() or 0)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_arm(arm: str, agents: int, payload_bytes: int, plugins: str, settings: list[str], cwd: str, timeout: float,
            python: str | None = None) -> dict:
    """One cold run of one arm, timed from the subprocess's start to its exit (and its CPU time)."""
    cmd = arm_command(arm, agents, payload_bytes, plugins, settings, python)
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "agents": agents, "seconds": None, "ok": False, "echoed": 0,
                "error": f"no exit within {timeout:g} s"}
    seconds = time.perf_counter() - t0
    return {"arm": arm, "agents": agents, "seconds": seconds, "cpu_seconds": _children_cpu() - cpu0,
            **check_output(arm, agents, payload_bytes, proc.returncode, proc.stdout, proc.stderr)}


def summarize(runs: list[dict], agents: list[int], plugins: str, arms: tuple[str, ...] = ARMS) -> list[dict]:
    """Per N and arm: median and min of the completed runs, ratios of the medians to the floor and the best stdlib peer."""
    rows = []
    for n in agents:
        medians = {}
        for arm in arms:
            times = [r["seconds"] for r in runs if r["agents"] == n and r["arm"] == arm and r["ok"]]
            medians[arm] = statistics.median(times) if times else None
        stdlib = [medians[a] for a in STDLIB if medians[a] is not None]
        best_stdlib = min(stdlib) if stdlib else None
        floor = medians["floor"]
        for arm in arms:
            mine = [r for r in runs if r["agents"] == n and r["arm"] == arm]
            done = [r for r in mine if r["ok"]]
            med = medians[arm]
            row = {
                "agents": n, "arm": arm, "label": arm_label(arm, plugins), "runs": len(mine), "completed": len(done),
                "median": med, "min": min((r["seconds"] for r in done), default=None),
                "cpu_median": statistics.median(r["cpu_seconds"] for r in done) if done else None,
                "vs_floor": med / floor if med is not None and floor else None,
                "vs_best_stdlib": med / best_stdlib if med is not None and best_stdlib else None,
                "errors": sorted({r["error"] for r in mine if r["error"]}),
            }
            if is_cfn(arm) and done:
                row["cfn_medians"] = {
                    k: statistics.median(r["cfn"][k] for r in done)
                    for k in ("open_seconds", "seconds", "close_seconds", "total_seconds")
                    if all(isinstance(r["cfn"].get(k), (int, float)) for r in done)
                }
            rows.append(row)
    return rows


def _s(v) -> str:
    return "-" if v is None else f"{v:.3f} s"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render_table(result: dict) -> str:
    """The plain-text table: one line per N and arm, the load average before and after."""
    load = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    m = result["machine"]
    lines = [
        f"whole process, cold, {result['settings']['repeat']} alternating repetition(s); "
        f"{m['cores']} cores, Python {m['python']}",
        f"load average (1/5/15 min): {load(m['load_average'])} at the start, {load(m['load_average_end'])} at the end",
        f"cfn's bytecode: {m.get('bytecode', 'as found')}; PYTHONDONTWRITEBYTECODE {'set' if m.get('dont_write_bytecode_env') else 'unset'}",
        "",
    ]
    header = ["N", "arm", "median", "min", "vs floor", "vs best stdlib", "CPU", "completed"]
    body = [
        [str(r["agents"]), r["label"], _s(r["median"]), _s(r["min"]), _x(r["vs_floor"]), _x(r["vs_best_stdlib"]),
         _s(r.get("cpu_median")), f"{r['completed']}/{r['runs']}"]
        for r in result["summary"]
    ]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    for row in [header] + body:
        lines.append("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    for r in result["summary"]:
        if r.get("cfn_medians"):
            cm = r["cfn_medians"]
            lines.append(
                f"{r['arm']} at {r['agents']}, inside the run (medians): open {_s(cm.get('open_seconds'))}, "
                f"round {_s(cm.get('seconds'))}, close {_s(cm.get('close_seconds'))}, total {_s(cm.get('total_seconds'))}"
            )
        for err in r["errors"]:
            lines.append(f"FAILED {r['arm']} at {r['agents']}: {err}")
    return "\n".join(lines)


def _agent_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"--agents {text!r}: expected positive whole numbers separated by commas, e.g. 100,500")
    return counts


def _other_python(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not all(c.isalnum() or c in "-_." for c in label) or not path:
        raise argparse.ArgumentTypeError(f"--cfn-python {text!r}: expected LABEL=PYTHON, e.g. main=/tmp/venv-main/bin/python")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise argparse.ArgumentTypeError(f"--cfn-python {text!r}: {path} is not an executable file")
    return label, path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cfn_core.bench.whole_process",
        description="cfn run, start to exit, against stand-alone ProcessPoolExecutor / multiprocessing scripts and the fork floor",
    )
    parser.add_argument("--agents", type=_agent_counts, default=[100, 500], help="agent counts, e.g. 100,500 (default)")
    parser.add_argument("--repeat", type=_positive, default=3, help="alternating repetitions per N (default 3)")
    parser.add_argument("--plugins", default="pool,parallel", help="cfn's plugins (default pool,parallel; pool.size is set to N)")
    parser.add_argument("--payload-bytes", type=int, default=64, help="payload per task (default 64, cfn's default)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="passed to cfn run's --set (repeatable), e.g. bus.root=/dev/shm/mine")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one arm may take (default 900)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write every run and the summary here")
    parser.add_argument("--cfn-python", dest="others", action="append", type=_other_python, default=[],
                        metavar="LABEL=PYTHON", help="also run the cfn arm with this interpreter (another checkout's venv), "
                        "as arm cfn@LABEL, alternating with the others (repeatable)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="do not byte-compile cfn's modules first (an editable checkout under PYTHONDONTWRITEBYTECODE=1 "
                        "then compiles them in every cfn process)")
    args = parser.parse_args(argv)
    if args.payload_bytes < 0:
        parser.error(f"--payload-bytes {args.payload_bytes}: must be 0 or more")

    pythons = {f"cfn@{label}": path for label, path in args.others}
    if len(pythons) != len(args.others):
        parser.error("--cfn-python: every LABEL must be different")
    arms = ARMS[:1] + tuple(pythons) + ARMS[1:]
    result = {
        "format": "cfn-whole-process/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "load_average": list(os.getloadavg())},
        "settings": {"agents": args.agents, "repeat": args.repeat, "plugins": args.plugins,
                     "payload_bytes": args.payload_bytes, "set": args.settings, "arms": list(arms),
                     "cfn_python": {"cfn": sys.executable, **pythons}},
        "runs": [],
    }
    if args.compile:
        packages = {label: compile_cfn(path) for label, path in {"cfn": sys.executable, **pythons}.items()}
        result["machine"]["bytecode"] = f"compiled first (packages per interpreter: {packages})"
    else:
        result["machine"]["bytecode"] = "as found (--no-compile)"
    result["machine"]["dont_write_bytecode_env"] = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    # a directory of its own, so that cfn run finds no cfn.toml above it: its defaults and these flags only
    with tempfile.TemporaryDirectory(prefix="cfn-whole-process-") as cwd:
        for rep in range(args.repeat):
            order = arms[rep % len(arms):] + arms[:rep % len(arms)]
            for n in args.agents:
                for arm in order:
                    print(f"whole_process: rep {rep + 1}/{args.repeat}, {n} agents, {arm}", file=sys.stderr, flush=True)
                    run = run_arm(arm, n, args.payload_bytes, args.plugins, args.settings, cwd, args.timeout,
                                  pythons.get(arm))
                    run["repetition"] = rep + 1
                    result["runs"].append(run)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["summary"] = summarize(result["runs"], args.agents, args.plugins, arms)
    print(render_table(result))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
