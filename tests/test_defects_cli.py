"""Regression tests of issue #13 (items 14, 15, 17, 19, 20, 21) and #20 (items 2, 5, 8, 11, 13).

Every test runs the real `cfn` command as a subprocess and checks what a user sees:
the exit status, the one line on stderr (no traceback), stdout, and that no run
directory is left under the bus root (the ``bus_root`` fixture fails the test
otherwise; tests on a small tmpfs check their own mount).
"""

from __future__ import annotations

import json
import os
import pty
import re
import resource
import select
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from cfn_core.testing import install_dist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(tmp_path, bus_root):
    """``cli(*args, extra_env=..., cwd=...)`` runs ``python -m cfn_core`` with a clean CFN_* environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)

    def run(*args, extra_env=None, cwd=None, timeout=180, **kwargs):
        merged = {k: v for k, v in {**env, **(extra_env or {})}.items() if v is not None}  # None: unset
        return subprocess.run(
            [sys.executable, "-m", "cfn_core", *args],
            cwd=cwd or tmp_path,
            env=merged,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    return run


def one_line(proc, code: int = 2) -> str:
    """The single stderr line of a failed command; asserts the exit status and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def small_tmpfs():
    """A 64 KiB tmpfs (a real file system that fills up); unmounted afterwards.

    Mounted on a short path: doorbell socket paths are limited to 107 bytes.
    """
    mount = Path(tempfile.mkdtemp(prefix="cfnfs-", dir="/tmp"))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()


def fill(mount: Path, leave: int) -> None:
    """Fill ``mount`` until only ``leave`` bytes are free."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(mount / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass


def run_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("cfn-"))


# ---------------------------------------------------------------------- #13.14: failure paths clean up


def test_metrics_file_naming_a_directory_fails_before_the_run(cli, tmp_path):
    proc = cli("run", "--agents", "2", "--metrics-file", str(tmp_path))
    line = one_line(proc)
    assert "[run] metrics_file" in line and "is a directory" in line
    assert proc.stdout == ""  # nothing was started


def test_metrics_file_that_cannot_be_written_at_the_end_still_removes_the_run(cli, tmp_path, bus_root):
    # the directory exists and is writable when the run starts; the file's place is taken during it
    target = tmp_path / "out" / "cfn.prom"
    target.parent.mkdir()
    handler = tmp_path / "takes_place.py"
    handler.write_text(f"import os\ndef handle(p):\n    os.makedirs({str(target)!r}, exist_ok=True)\n    return p\n")
    proc = cli("run", "--agents", "1", "--handler", "takes_place:handle", "--metrics-file", str(target))
    line = one_line(proc, 3)
    assert "metrics_file" in line and "cannot write" in line
    assert "cfn run: FAILED" in proc.stdout  # the summary of what ran, with the cause
    assert run_dirs(bus_root) == []


def test_a_bus_root_with_no_space_fails_in_one_line_and_leaves_nothing(cli, small_tmpfs):
    fill(small_tmpfs, 0)
    proc = cli("run", "--agents", "2", extra_env={"CFN_BUS_ROOT": str(small_tmpfs)})
    line = one_line(proc)
    assert str(small_tmpfs) in line and "full" in line
    assert run_dirs(small_tmpfs) == []


# ---------------------------------------------------------------------- #13.21: the cause, and exit codes


def test_a_bus_that_fills_mid_run_gives_the_partial_json_with_the_cause(cli, small_tmpfs):
    proc = cli(
        "run", "--agents", "4", "--tasks", "400", "--payload-bytes", "1000", "--json",
        extra_env={"CFN_BUS_ROOT": str(small_tmpfs)},
    )
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout)  # stdout is the JSON document, whatever happened
    assert out["exit_code"] == 3 and out["ok"] is False
    assert "full" in out["error"]
    assert out["tasks"] == 400 and out["rounds"][0]["error"] == out["error"]  # the stopped round is kept
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"cfn: error: {out['error']}"
    assert run_dirs(small_tmpfs) == []


def test_a_nearly_full_bus_at_start_is_named_as_the_cause(cli, small_tmpfs):
    fill(small_tmpfs, 8192)
    proc = cli("run", "--agents", "3", "--json", extra_env={"CFN_BUS_ROOT": str(small_tmpfs)})
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    reasons = out["rounds"][0]["spawn_failures"]
    assert len(reasons) == 3
    assert all("the bus is full" in why and str(small_tmpfs) in why for why in reasons.values()), reasons
    summary = cli("run", "--agents", "3", extra_env={"CFN_BUS_ROOT": str(small_tmpfs)}).stdout
    assert "the bus is full" in summary
    assert run_dirs(small_tmpfs) == []


def test_a_mesh_that_cannot_fit_is_refused_before_anything_starts(cli, tmp_path):
    imports = tmp_path / "imports.log"  # one line per process that imported the handler
    (tmp_path / "counted.py").write_text(
        f"import os\nwith open({str(imports)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
        "def handle(p):\n    return p\n"
    )
    proc = cli(
        "run", "--agents", "30", "--topology", "mesh", "--messages-per-agent", "20", "--set", "bus.inbox_depth=5",
        "--handler", "counted:handle",
    )
    line = one_line(proc)  # 2: "nothing was started", as documented
    assert "inbox_depth = 5" in line and "mesh round 1" in line
    assert proc.stdout == ""
    assert not imports.exists()  # no agent was spawned (nor the handler even imported)


# ---------------------------------------------------------------------- #13.15: [pool] size is checked like agents


def test_pool_size_over_max_agents_is_refused(cli):
    proc = cli("run", "--agents", "2", "--plugins", "pool", "--set", "pool.size=300", "--set", "run.max_agents=50")
    line = one_line(proc)
    assert "[pool] size = 300 exceeds [run] max_agents = 50" in line
    assert proc.stdout == ""


def test_pool_size_beyond_the_fd_limit_is_refused_before_any_agent_starts(cli):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = cli("run", "--agents", "2", "--plugins", "pool", "--set", "pool.size=1500", preexec_fn=low_limit)
    line = one_line(proc)
    assert "[pool] size = 1500" in line and "RLIMIT_NOFILE" in line


# ---------------------------------------------------------------------- #13.17: relative bus root and chdir


def test_a_relative_bus_root_survives_a_handler_that_changes_directory(cli, tmp_path, bus_root):
    # pooled agents live across rounds: after the handler's chdir (deeper than where cfn ran,
    # so a relative path no longer leads to the bus) they still send peer messages and ring
    deeper = tmp_path / "a" / "b" / "c"
    deeper.mkdir(parents=True)
    (tmp_path / "wanders.py").write_text(f"import os\ndef handle(p):\n    os.chdir({str(deeper)!r})\n    return p\n")
    relative = os.path.relpath(bus_root, tmp_path)
    proc = cli(
        "run", "--plugins", "pool", "--set", "pool.size=4", "--agents", "4", "--topology", "mesh",
        "--messages-per-agent", "3", "--rounds", "3", "--handler", "wanders:handle", "--timeout", "20", "--json",
        extra_env={"CFN_BUS_ROOT": relative},
    )
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, (out["rounds"][-1]["errors"], proc.stderr[-2000:])
    # a lost doorbell leaves a receiver asleep on its peer messages until the watchdog kills it
    assert out["delivery_rate"] == 1.0 and out["retries"] == 0, out["plugin_figures"]


# ---------------------------------------------------------------------- #13.19: tracebacks become one line


def test_a_cfn_toml_that_is_not_utf8(cli, tmp_path):
    (tmp_path / "cfn.toml").write_bytes(b"plugins = []\n# caf\xe9 \xff\n")
    line = one_line(cli("run"))
    assert str(tmp_path / "cfn.toml") in line and "not UTF-8" in line


@pytest.mark.parametrize("value", ["5", '"x"', "[1, 2]"])
def test_a_pyproject_whose_tool_cfn_is_not_a_table(cli, tmp_path, value):
    (tmp_path / "pyproject.toml").write_text(f"[tool]\ncfn = {value}\n")
    line = one_line(cli("run"))
    assert "pyproject.toml" in line and "[tool] cfn" in line and "must be a table" in line


def test_a_handler_module_that_exits_at_import(cli, tmp_path):
    (tmp_path / "leaves.py").write_text('import sys\nsys.exit("bye")\n')
    line = one_line(cli("run", "--handler", "leaves:handle"))
    assert "[workload] handler = 'leaves:handle'" in line and "sys.exit('bye')" in line


BREAKER = textwrap.dedent(
    '''
    """A plugin whose assignment step crashes (installed through a real entry point)."""
    from cfn_core import hookimpl


    @hookimpl
    def cfn_assign(ctx, task, agent_ids):
        raise RuntimeError("assignment table corrupted")
    '''
)


@pytest.fixture
def breaker_installed(tmp_path):
    """The plugin ``breaker`` installed on PYTHONPATH with a dist-info entry point in group cfn."""
    site = tmp_path / "site"
    install_dist(site, "cfn-breaker", {"breaker": "cfn_breaker"}, modules={"cfn_breaker": BREAKER})
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_a_strict_plugin_failure_is_one_line_and_a_summary(cli, breaker_installed):
    proc = cli("run", "--agents", "2", "--plugins", "breaker", "--strict", extra_env=breaker_installed)
    line = one_line(proc, 3)
    assert "plugin 'breaker' failed in cfn_assign" in line and "assignment table corrupted" in line
    assert "cfn run: FAILED" in proc.stdout and "stopped: plugin 'breaker'" in proc.stdout
    # without --strict the baseline takes over and the run succeeds
    relaxed = cli("run", "--agents", "2", "--plugins", "breaker", extra_env=breaker_installed)
    assert relaxed.returncode == 0 and "fallback: breaker failed in cfn_assign" in relaxed.stdout


# ---------------------------------------------------------------------- #13.20: misspelt variables, clean


def test_misspelt_cfn_variables_are_warned_about_with_a_did_you_mean(cli):
    proc = cli("run", "--agents", "1", extra_env={"CFN_WORKLOAD_AGENT": "3", "CFN_POOL_SIZ": "3", "CFN_SOMETHING_ELSE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "CFN_WORKLOAD_AGENT is not a cfn setting (did you mean 'CFN_WORKLOAD_AGENTS'?)" in proc.stderr
    assert "CFN_POOL_SIZ is not a cfn setting (did you mean 'CFN_POOL_SIZE'?)" in proc.stderr
    assert "CFN_SOMETHING_ELSE" not in proc.stderr  # another program's variable: not ours to judge


def test_clean_of_a_root_that_does_not_exist(cli, tmp_path):
    line = one_line(cli("clean", "--root", str(tmp_path / "nonexistent")))
    assert "--root" in line and "nonexistent" in line and "no such directory" in line
    line = one_line(cli("clean", extra_env={"CFN_BUS_ROOT": str(tmp_path / "gone")}))
    assert "[bus] root" in line and "gone" in line


# ---------------------------------------------------------------------- #20.2: live spawn progress


def test_the_spawn_progress_shows_agents_started_and_ready_with_rate_and_eta(tmp_path, bus_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    master, slave = pty.openpty()  # stderr is a terminal: the live line is drawn
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfn_core", "run", "--agents", "12"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    proc.stdout.close()
    # the view redraws in place (rich: cursor moves and erases between frames)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode())
    frames = [f.strip() for f in re.split(r"[\r\n]", text) if f.strip().startswith("spawn")]
    counts = {int(f.split("]")[1].split("/")[0]) for f in frames if "ready" in f}
    assert len(counts) >= 3, frames  # it moves while agents start, not stuck at 0/12
    assert any("started" in f and "/s" in f and "ETA" in f for f in frames), frames
    assert max(counts) == 12


# ---------------------------------------------------------------------- #20.5: stdout is the JSON document


def test_prints_during_a_json_run_do_not_corrupt_the_document(cli, tmp_path):
    (tmp_path / "chatty.py").write_text(
        "print('hello from import')\n"
        "def handle(p):\n    print('hello from the handler')\n    return p\n"
    )
    proc = cli("run", "--agents", "2", "--handler", "chatty:handle", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    assert "hello from import" in proc.stderr  # moved, not lost


# ---------------------------------------------------------------------- #20.8: the kill switch wins


def test_no_name_wins_over_a_feature_flag(cli, tmp_path):
    (tmp_path / "cfn.toml").write_text('plugins = ["pool", "no:pool"]\n')
    proc = cli("run", "--agents", "2", "--json", extra_env={"CFN_ENABLE_POOLING": "true"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugins"] == []


def test_cfn_disable_plugins_wins_over_the_command_line(cli):
    proc = cli("run", "--agents", "2", "--plugins", "pool,batch", "--json", extra_env={"CFN_DISABLE_PLUGINS": "pool"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugins"] == ["batch"]


# ---------------------------------------------------------------------- #20.11: paths relative to the cfn.toml


def test_handler_and_command_resolve_against_the_cfn_toml_directory(cli, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "localhandler.py").write_text("def handle(p):\n    return 'handled'\n")
    (project / "tool.sh").write_text("cat >/dev/null; echo scripted\n")
    (project / "cfn.toml").write_text('[workload]\nagents = 2\nhandler = "localhandler:handle"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("run", "--config", str(Path("..") / "project" / "cfn.toml"), "--json", "--results", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert {r["value"] for r in json.loads(proc.stdout)["rounds"][0]["results"].values()} == {"handled"}
    (project / "cfn.toml").write_text('[workload]\nagents = 2\ncommand = "sh tool.sh"\n')
    proc = cli("run", "--config", "../project/cfn.toml", "--json", "--results", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert {r["value"].strip() for r in json.loads(proc.stdout)["rounds"][0]["results"].values()} == {"scripted"}


def test_the_echo_example_runs_from_the_repository_root(cli):
    proc = cli("run", "--config", "examples/echo/cfn.toml", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "cfn run: OK" in proc.stdout


def test_a_relative_bus_root_in_cfn_toml_is_relative_to_the_file(cli, tmp_path, bus_root):
    project = tmp_path / "project"
    project.mkdir()
    (project / "cfn.toml").write_text(f'[bus]\nroot = "{os.path.relpath(bus_root, project)}"\n[workload]\nagents = 1\n')
    # from a deeper directory the same relative path leads somewhere else (not to the bus root)
    deeper = tmp_path / "a" / "b" / "c" / "d" / "e"
    deeper.mkdir(parents=True)
    proc = cli("run", "--config", str(project / "cfn.toml"), "--json", extra_env={"CFN_BUS_ROOT": None}, cwd=deeper)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True  # and the bus_root fixture saw the run directory go


# ---------------------------------------------------------------------- #20.13: summary and help


def test_the_pool_summary_is_wrapped_and_total_counts_the_session(cli):
    proc = cli("run", "--agents", "3", "--plugins", "pool", "--set", "pool.size=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    pool_start = next(i for i, line in enumerate(lines) if line.startswith("  pool: "))
    pool_lines = [lines[pool_start]] + [line for line in lines[pool_start + 1:] if line.startswith("        ")]
    assert len(pool_lines) > 1 and all(len(line) <= 100 for line in pool_lines), pool_lines
    total = next(line for line in lines if line.startswith("  total "))
    assert "session open" in total and "session close" in total
    out = json.loads(cli("run", "--agents", "3", "--plugins", "pool", "--set", "pool.size=3", "--json").stdout)
    assert out["open_seconds"] > 0 and out["close_seconds"] > 0
    assert out["total_seconds"] == pytest.approx(out["open_seconds"] + out["seconds"] + out["close_seconds"])


def test_run_help_names_each_metrics_value_for_what_it_is(cli):
    text = cli("run", "--help").stdout
    assert "--metrics-port PORT" in text and "--metrics-file PATH" in text
    assert "METRICS" not in text
