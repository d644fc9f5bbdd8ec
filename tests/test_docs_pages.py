"""The hand-written docs stay true to the code: links resolve, the plugin table in
ARCHITECTURE.md names the hooks each bundled plugin implements, the metrics table in
USER_GUIDE.md lists the kernel's metrics, and the exit codes are the CLI's."""

import re
from pathlib import Path

import pytest

from cfn_core import hookspecs
from cfn_core.metrics import Metrics
from cfn_core.plugins import installed, load_plugin

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "docs" / name for name in ("USER_GUIDE.md", "PLUGIN_GUIDE.md", "OPERATIONS.md", "ARCHITECTURE.md", "CONFIG.md", "TESTING.md")
] + sorted((ROOT / "examples").glob("*/README.md")) + [ROOT / "examples" / "README.md"]
HOOKS = {name[4:] for name in vars(hookspecs) if name.startswith("cfn_")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#") or target.startswith("<"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target} does not resolve"


def architecture_rows() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = {}
    for name, rest in re.findall(r"^\| `(\w+)` \|(.*)$", text, flags=re.M):
        rows[name] = {w for w in re.findall(r"[a-z_]+", rest) if w in HOOKS}
    return rows


def test_architecture_names_the_hooks_each_bundled_plugin_implements():
    rows = architecture_rows()
    checked = 0
    for name in ("pool", "parallel", "batch", "shard", "redis", "limits", "llm"):
        if name not in installed():
            continue
        plugin = load_plugin(name)
        implemented = {h[4:] for h in dir(plugin) if h.startswith("cfn_") and callable(getattr(plugin, h))}
        implemented -= {"settings", "configure"}  # every plugin with a table has these
        assert rows.get(name) == implemented, f"ARCHITECTURE.md row for {name!r}"
        checked += 1
    assert checked


def test_user_guide_lists_every_kernel_metric():
    text = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    listed = set(re.findall(r"^\| `(cfn_\w+?)(?:_total)?(?:\{[\w,]+\})?` \|", text, flags=re.M))
    exported = {m.name for m in Metrics().registry.collect()}
    assert listed == exported


def test_exit_codes_match_the_cli():
    from cfn_core import cli

    text = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M))
    assert set(table) == {"0", "1", "2", "3", "4", "129", "130", "143"}
    doc = cli.__doc__
    for code in table:
        assert code in doc


def test_the_user_guide_python_example_runs(tmp_path, bus_root, no_leaks):
    import subprocess
    import sys

    if not {"pool", "batch"} <= set(installed()):
        pytest.skip("the example enables the bundled pool and batch plugins")
    text = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "cfn.toml").write_text(f'[bus]\nroot = "{bus_root}"\n')
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("True 0 1.0 {")
    assert lines[1].startswith("r1-t000000 True payload 1 None ")  # then the agent id
    assert lines[2].startswith("r1-t000001 True {'x': 2} None ")
