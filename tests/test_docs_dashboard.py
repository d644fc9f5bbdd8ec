"""docs/grafana-dashboard.json and docs/prometheus.yml use only metrics the code exports.

The exported names are collected the way Prometheus would see them: real
coordinations (the baseline, then each installed bundled plugin enabled on its
own) write the text exposition format through ``[run] metrics_file``, which is
parsed with prometheus_client's parser.  A renamed metric breaks this test
instead of silently emptying a panel.
"""

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfn_core import Coordinator
from cfn_core.config import config_from_dict
from cfn_core.plugins import installed

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

#: the bundled plugins whose metrics the dashboard shows, with settings that keep the run small
PLUGINS = {"pool": {"pool": {"size": 2}}, "batch": {}, "parallel": {}, "shard": {}, "llm": {}, "limits": {}}

#: the plan's panels, each with a metric it must query
REQUIRED_PANELS = {
    "coordination time histogram": "cfn_coordination_seconds_bucket",
    "delivery rate": "cfn_delivery_rate",
    "pool hit rate": "cfn_pool_hit_rate",
    "batch sizes": "cfn_batch_messages_per_batch_bucket",
    "shard balance": "cfn_shard_",
    "spawn failures": "cfn_spawn_failures_total",
}

PROMQL_WORDS = {"sum", "rate", "increase", "by", "le", "histogram_quantile", "max", "min", "avg", "without"}


def queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, $__rate_interval
    expr = re.sub(r"\bby \([^)]*\)", "", expr)  # grouping labels
    return {w for w in re.findall(r"\b[a-zA-Z_:][\w:]*\b", expr) if w.startswith("cfn_")}


#: the series Prometheus stores for a metric family of each type
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def sample_names(text: str) -> set[str]:
    """Every series name the exposition text can produce, also for labelled families
    that have no sample yet (a fallback counter before the first fallback)."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + suffix for suffix in SUFFIXES.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """``{plugin or "kernel": sample names}`` from real runs."""
    out = {}
    root = tmp_path_factory.mktemp("bus")
    for name in ["kernel", *[p for p in PLUGINS if p in installed()]]:
        path = tmp_path_factory.mktemp("metrics") / f"{name}.prom"
        data = {
            "plugins": [] if name == "kernel" else [name],
            "workload": {"agents": 3, "topology": "mesh", "messages_per_agent": 2},
            "bus": {"root": str(root)},
            "run": {"metrics_file": str(path)},
            **PLUGINS.get(name, {}),
        }
        with Coordinator(config_from_dict(data)) as coord:
            assert coord.run().ok
        out[name] = sample_names(path.read_text())
    assert not list(root.iterdir())
    return out


def test_the_dashboard_is_an_importable_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in queries():
        assert expr.count("(") == expr.count(")"), f"{title}: unbalanced parentheses in {expr}"


def test_the_plans_panels_are_there():
    exprs = " ".join(expr for _title, expr in queries())
    for panel, metric in REQUIRED_PANELS.items():
        if panel == "shard balance" and not (ROOT / "plugins" / "cfn-shard" / "pyproject.toml").exists():
            continue  # cfn-shard is not in this tree yet
        assert metric in exprs, f"no panel queries {metric} ({panel})"


def test_every_queried_metric_is_exported(exported):
    all_names = set().union(*exported.values())
    missing_plugins = [p for p in PLUGINS if p not in installed()]
    for title, expr in queries():
        for name in metric_names(expr) - PROMQL_WORDS:
            owner = name.split("_")[1]
            if name not in all_names and owner in missing_plugins:
                pytest.fail(f"panel {title!r} queries {name}, but plugin {owner!r} is not installed: "
                            "pip install -r requirements.txt")
            assert name in all_names, f"panel {title!r} queries {name}, which no code exports"


def test_kernel_metrics_are_all_on_the_dashboard(exported):
    used = set().union(*(metric_names(e) for _t, e in queries()))
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported["kernel"]}
    shown = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in used}
    assert families - shown == set(), "kernel metrics no panel shows"


def test_prometheus_yml_scrapes_what_cfn_serves(make_config, no_leaks):
    import socket
    import urllib.request

    text = (ROOT / "docs" / "prometheus.yml").read_text()
    port = re.search(r'targets: \["127\.0\.0\.1:(\d+)"\]', text).group(1)
    assert "metrics_path: /metrics" in text
    assert f"--metrics-port {port}" in (ROOT / "docs" / "OPERATIONS.md").read_text()
    # the endpoint itself, on a free port (the documented one may be taken on this machine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with Coordinator(make_config(workload={"agents": 2}, run={"metrics_port": free})) as coord:
        assert coord.run().ok
        body = urllib.request.urlopen(f"http://127.0.0.1:{free}/metrics", timeout=10).read().decode()
    assert "cfn_coordination_seconds_count 1.0" in body
    assert "cfn_delivery_rate 1.0" in body
