"""The commands and code of README.md, docs/USER_GUIDE.md and docs/PLUGIN_GUIDE.md run, as
datasette's documentation tests run its docs: what a newcomer copies must work.

Every snippet (one line of an indented shell block, or a fenced ```python block; see
tests/docs_snippets.py) is run in document order, in a private directory holding the files
the page assumes, on a private bus root, and must exit 0; where it is cheap, its output is
checked too.  A snippet that cannot run here is listed in NOT_RUN with the reason, and one
run in a changed form in SUBSTITUTED: nothing is skipped silently, and an entry that no
longer matches a snippet of the docs fails the test (so the lists cannot go stale).
TOML and JSON blocks are parsed, and sample output is compared with the real output where
the sample says what it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_snippets import Snippet, is_command, snippets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/USER_GUIDE.md", "docs/PLUGIN_GUIDE.md")
BIN = Path(sys.executable).parent  # the environment's cfn, pip and python come first on PATH

#: Snippets not run here, each with the reason.
NOT_RUN = {
    "README.md: pip install -r requirements.txt && cfn run":
        "installs into the environment; .ci/run runs it verbatim in a fresh virtualenv",
    "README.md: pip install -r requirements-test.txt && pytest -n auto":
        "the whole test suite, of which this test is part; .ci/run runs it verbatim (under two CPU hogs)",
    "README.md: cfn run --agents 500 --json":
        "the 500-agent baseline takes minutes (the README says so); the same command at 500 agents "
        "with pool,parallel runs here, and the baseline at small sizes runs in every other line",
    "docs/USER_GUIDE.md: git clone <this repository> && cd <it>":
        "set-up of a fresh clone (placeholders); .ci/run starts from a clean checkout",
    "docs/USER_GUIDE.md: python -m venv .venv && . .venv/bin/activate":
        "set-up; .ci/run makes a fresh virtualenv the same way",
    "docs/USER_GUIDE.md: pip install -r requirements.txt":
        "installs into the environment; .ci/run runs it (the README's first command)",
    "docs/USER_GUIDE.md: cfn run --plugins redis --set redis.url=redis://db-host:6379/0 --set redis.wait_hosts=1 --agents 1000":
        "needs a Redis server at db-host and a second machine running cfn agent; "
        "plugins/cfn-redis/tests/test_redis_hosts.py runs coordinator and cfn agent against a real Redis",
    "docs/USER_GUIDE.md: cfn agent --bus redis://db-host:6379/0 --agents 500":
        "the other machine's half of the line above (same test)",
    "docs/USER_GUIDE.md: from cfn_core import Coordinator, load_config":
        "run by tests/test_docs_pages.py::test_the_user_guide_python_example_runs, which also checks what it prints",
    "docs/USER_GUIDE.md: cfn top":
        "needs a live run in another terminal; tests/test_top.py runs cfn top in a tmux pane against a live run",
    "docs/USER_GUIDE.md: cfn top --once":
        "needs a live run; tests/test_top.py runs it against one and checks the frame",
    "docs/USER_GUIDE.md: cfn stop":
        "needs a live run; tests/test_top.py stops live runs with it and checks their exit status 143",
    "docs/PLUGIN_GUIDE.md: @hookimpl(wrapper=True)":
        "a fragment inside the explanation of wrappers: `record` and the imports are the reader's",
}

#: Snippets run in another form: ``{id: (what runs instead, why)}``.
SUBSTITUTED = {
    "docs/PLUGIN_GUIDE.md: pip install -e .": (
        f'"{sys.executable}" -m pip install --quiet --no-deps --target "$CFN_TEST_SITE" .',
        "installs the same pyproject.toml into a private directory on PYTHONPATH instead of this "
        "environment, so no test leaves a plugin installed for the others",
    ),
}

#: What a snippet's output must contain (stdout and stderr together), where cheap to say.
EXPECT = {
    "README.md: cfn run --agents 500 --plugins pool,parallel": r"cfn run: OK .*\n  agents 500 ",
    "README.md: cfn run --topology mesh --messages-per-agent 20 --plugins pool,parallel,batch,shard":
        r"cfn run: OK .*topology=mesh",
    "README.md: cfn plugins": r"(?m)^pool +installed +cfn-pool ",
    "README.md: cfn init example.toml": r"wrote .*example\.toml",
    "README.md: cfn clean": r"0 stale run\(s\) removed",
    "README.md: from cfn_core import Coordinator, load_config": r"(?m)^1\.0 \{'spawn': ",
    "docs/USER_GUIDE.md: cfn run": r"cfn run: OK ",
    "docs/USER_GUIDE.md: # two agents: one task asks, the other agent answers in on_message": r"(?m)^agent-0002 got 'hello'$",
    "docs/USER_GUIDE.md: cfn run --json | python -c 'import json,sys; r=json.load(sys.stdin); "
    "print(r[\"delivery_rate\"], r[\"phases\"][\"spawn\"])'": r"(?m)^1\.0 \d",
    "docs/USER_GUIDE.md: from cfn_core import Coordinator, Task, load_config":
        r"(?m)^code-0 coder-0001 part 0\n(.|\n)*^plan planner-0001 \{\"job\": \"split\"\}\nreview reviewer-0001 LOOKS GOOD$",
    "docs/PLUGIN_GUIDE.md: cfn run --plugins mine": r"(?m)^round 1: (\d+)/\1 delivered in \d+\.\d{3} s$",
    "docs/PLUGIN_GUIDE.md: cfn plugins --plugins mine":
        r"(?m)^mine +enabled +cfn-mine 0\.1\.0 +\(my_plugin\)\n +cfn_coordination_finish +call order: mine$",
    "docs/PLUGIN_GUIDE.md: # test_my_plugin.py": r"2 passed",
}

#: The files a page's reader has in the directory they run its commands in.
SMALL_CFN_TOML = "# a small project: the guide's commands work with any cfn.toml\n[workload]\nagents = 4\n"


def all_snippets() -> list[Snippet]:
    return [s for page in PAGES for s in snippets(ROOT, page)]


def _prepare(page: str, workdir: Path) -> None:
    """Put in ``workdir`` what the page's reader has there."""
    if page == "README.md":
        shutil.copy(ROOT / "cfn.toml", workdir / "cfn.toml")  # the README is read in the repository
    elif page == "docs/USER_GUIDE.md":
        (workdir / "cfn.toml").write_text(SMALL_CFN_TOML)
        for s in snippets(ROOT, page):  # the handler modules the guide shows (# pingpong.py)
            m = re.match(r"# ([\w.-]+\.py)$", s.first_line)
            if s.lang == "python" and m:
                (workdir / m.group(1)).write_text(s.text)
    else:
        # the files the guide names in their first line (# my_plugin.py, # pyproject.toml, ...)
        for s in snippets(ROOT, page):
            m = re.match(r"# ([\w.-]+\.(?:py|toml))\b", s.first_line)
            if s.lang in ("python", "toml") and m:
                (workdir / m.group(1)).write_text(s.text)


def _env(bus_root: Path, site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env["CFN_BUS_ROOT"] = str(bus_root)
    env["CFN_TEST_SITE"] = str(site)
    env.pop("PYTEST_ADDOPTS", None)  # the nested pytest of the guide's test example runs as a reader's would
    return env


def _command(s: Snippet, workdir: Path) -> list[str] | None:
    """The argv that runs snippet ``s``, or None when it is not run by itself."""
    if s.id in SUBSTITUTED:
        return ["bash", "-e", "-o", "pipefail", "-c", SUBSTITUTED[s.id][0]]
    if s.lang == "shell":
        return ["bash", "-e", "-o", "pipefail", "-c", s.text]
    if s.lang == "python":
        m = re.match(r"# (test_\w+\.py)$", s.first_line)
        if m:  # a test module: run it with pytest, as the guide says
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", m.group(1)]
        if re.match(r"# \w+\.py$", s.first_line):
            return None  # a module the page's other snippets import (written by _prepare)
        return [sys.executable, "-c", s.text]
    return None


@pytest.mark.parametrize("page", PAGES)
def test_every_snippet_of_the_page_runs(page, tmp_path, bus_root, no_leaks):
    workdir = tmp_path / "work"
    workdir.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    _prepare(page, workdir)
    env = _env(bus_root, site)
    ran = []
    for s in snippets(ROOT, page):
        if s.id in NOT_RUN:
            continue
        argv = _command(s, workdir)
        if argv is None:
            continue
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        where = f"{s.page}:{s.line}: {s.first_line}"
        assert proc.returncode == 0, f"{where}\nexit {proc.returncode}\n{output[-3000:]}"
        if s.id in EXPECT:
            assert re.search(EXPECT[s.id], output), f"{where}\noutput does not match {EXPECT[s.id]!r}:\n{output[-3000:]}"
        ran.append(s.id)
    assert ran, f"no snippet of {page} ran"
    print(f"\n{page}: {len(ran)} snippets ran")


def test_every_snippet_is_run_or_listed():
    """A shell or Python snippet is run, or listed with a reason; the lists name real snippets."""
    ids = {s.id for s in all_snippets()}
    for table in (NOT_RUN, SUBSTITUTED, EXPECT):
        stale = sorted(set(table) - ids)
        assert not stale, f"listed in tests/test_docs_snippets.py but no longer in the docs: {stale}"
    assert not set(NOT_RUN) & set(SUBSTITUTED)
    for s in all_snippets():
        if s.lang in ("shell", "python") and s.id not in NOT_RUN:
            assert _command(s, ROOT) is not None or re.match(r"# \w+\.py$", s.first_line), s.id


def test_shell_blocks_hold_commands_only():
    """A block that starts with a command is all commands (output goes in a block of its own),
    so that every line of it is run."""
    for page in PAGES:
        for s in snippets(ROOT, page):
            if s.lang == "shell":
                assert is_command(s.text), f"{page}:{s.line}: {s.first_line!r} mixes commands and output"


def test_toml_and_json_blocks_parse():
    from cfn_core.config import config_from_dict

    checked = 0
    for s in all_snippets():
        if s.lang == "toml":
            data = tomllib.loads(s.text)
            if "project" not in data and "build-system" not in data:
                config_from_dict(data)  # a cfn.toml fragment: valid as a configuration too
            checked += 1
        elif s.lang == "json":
            json.loads(s.text)
            checked += 1
    assert checked >= 4


def test_the_user_guide_json_sample_has_the_real_top_level_keys(tmp_path, bus_root):
    (sample,) = [s for s in snippets(ROOT, "docs/USER_GUIDE.md") if s.lang == "json"]
    (tmp_path / "cfn.toml").write_text(SMALL_CFN_TOML)
    proc = subprocess.run(
        [str(BIN / "cfn"), "run", "--json"], cwd=tmp_path, env=_env(bus_root, tmp_path),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    real = json.loads(proc.stdout)
    assert set(json.loads(sample.text)) == set(real)


def _matches_abridged(sample: str, real: str) -> None:
    """``real`` is ``sample`` line for line, where a ``...`` line of the sample stands for one or
    more lines it leaves out (so an abridged sample must say where it abridges)."""
    pattern = ""
    for line in sample.rstrip("\n").splitlines():
        pattern += r"(?:.*\n)+?" if line.strip().startswith("...") else re.escape(line.rstrip()) + r"\n"
    text = "".join(line.rstrip() + "\n" for line in real.splitlines())
    assert re.fullmatch(pattern, text), f"the sample is not the real output:\n--- sample:\n{sample}--- real:\n{text}"


def _cfn_plugins(cwd: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([str(BIN / "cfn"), "plugins", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_user_guide_cfn_plugins_sample_is_what_it_prints(tmp_path, bus_root):
    """The guide shows `cfn plugins` in the repository (its cfn.toml enables nothing), abridged."""
    from cfn_core.plugins import installed

    if set(installed()) != {"batch", "limits", "llm", "parallel", "pool", "redis", "shard"}:
        pytest.skip("the sample lists the bundled plugins and no others (pip install -r requirements.txt)")
    (sample,) = [s for s in snippets(ROOT, "docs/USER_GUIDE.md") if s.lang == "output" and s.first_line.startswith("builtin ")]
    _matches_abridged(sample.text, _cfn_plugins(ROOT, _env(bus_root, tmp_path)))


def _pip_install_target(source: Path, site: Path, env: dict) -> None:
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(source)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr


def test_the_tracer_readme_cfn_plugins_sample_is_what_it_prints(tmp_path, bus_root):
    page = ROOT / "examples" / "third-party-plugin" / "README.md"
    (sample,) = [s for s in snippets(ROOT, str(page.relative_to(ROOT))) if s.first_line.startswith("tracer ")]
    source = tmp_path / "cfn-tracer"  # built from a copy: setuptools writes build/ next to the sources
    shutil.copytree(page.parent, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = _env(bus_root, tmp_path / "site")
    _pip_install_target(source, tmp_path / "site", env)
    real = _cfn_plugins(tmp_path, env, "--plugins", "tracer")
    section = re.search(r"(?ms)^tracer .*?(?=^\S|\Z)", real).group(0)
    _matches_abridged(sample.text, section)


def test_the_plugin_guide_imports_only_the_public_api():
    """The guide's rule: a plugin imports names of `cfn_core` and `cfn_core.hookspecs` only
    (transport plugins also `cfn_core.bus` and `cfn_core.builtin`); its own samples keep it."""
    allowed = {"cfn_core", "cfn_core.hookspecs"}
    for s in snippets(ROOT, "docs/PLUGIN_GUIDE.md"):
        if s.lang != "python":
            continue
        for module in re.findall(r"^\s*(?:from|import)\s+(cfn_core[\w.]*)", s.text, flags=re.M):
            assert module in allowed, f"PLUGIN_GUIDE.md:{s.line}: a sample imports {module}, which the guide tells plugins not to"


def test_the_packaging_sample_installs(tmp_path, bus_root):
    """PLUGIN_GUIDE's Packaging pyproject.toml (the guide's last), around a package, installs and is found by name."""
    sample = [s for s in snippets(ROOT, "docs/PLUGIN_GUIDE.md") if s.lang == "toml" and "[project" in s.text][-1]
    source = tmp_path / "cfn-mine"
    (source / "cfn_mine").mkdir(parents=True)
    (source / "pyproject.toml").write_text(sample.text)
    (source / "cfn_mine" / "__init__.py").write_text(
        "from cfn_core import hookimpl\n\n@hookimpl\ndef cfn_report(ctx):\n    return {'mine': {'ok': 1}}\n"
    )
    env = _env(bus_root, tmp_path / "site")
    _pip_install_target(source, tmp_path / "site", env)
    real = _cfn_plugins(tmp_path, env, "--plugins", "mine")
    assert re.search(r"(?m)^mine +enabled +cfn-mine 0\.1\.0 +\(cfn_mine\)$", real), real
