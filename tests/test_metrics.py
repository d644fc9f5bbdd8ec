"""Prometheus metrics owned by the coordinator: names, values after real runs, exporters."""

from __future__ import annotations

import socket
import urllib.request

from cfn_core import Coordinator, hookimpl
from cfn_core.metrics import PHASES, Metrics

#: the public names (Grafana dashboards use them); counters get ``_total`` in the exposition
NAMES = {
    "cfn_coordination_seconds": "histogram",
    "cfn_phase_seconds": "histogram",
    "cfn_delivery_rate": "gauge",
    "cfn_messages_sent": "counter",
    "cfn_messages_delivered": "counter",
    "cfn_messages_dead_lettered": "counter",
    "cfn_agent_spawn_seconds": "histogram",
    "cfn_agents": "gauge",
    "cfn_agent_exits": "counter",
    "cfn_task_retries": "counter",
    "cfn_task_failures": "counter",
    "cfn_fallbacks": "counter",
    "cfn_task_latency_seconds": "histogram",
}


def test_kernel_metric_names_and_types():
    m = Metrics()
    found = {fam.name: fam.type for fam in m.registry.collect()}
    assert found == NAMES


def test_each_coordinator_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.messages_sent.inc(5)
    assert a.registry.get_sample_value("cfn_messages_sent_total") == 5
    assert b.registry.get_sample_value("cfn_messages_sent_total") == 0


def test_write_and_serve(tmp_path):
    m = Metrics()
    m.agents.set(7)
    path = tmp_path / "m.prom"
    m.write(str(path))
    assert "cfn_agents 7.0" in path.read_text().splitlines()
    server = m.serve(0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert "cfn_agents 7.0" in resp.read().decode().splitlines()
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_values_after_a_two_round_run(make_config, no_leaks):
    config = make_config(workload={"agents": 3, "rounds": 2})
    with Coordinator(config) as coord:
        result = coord.run()
        get = coord.ctx.metrics.registry.get_sample_value
        values = {
            "rounds": get("cfn_coordination_seconds_count"),
            "phases": {p: get("cfn_phase_seconds_count", {"phase": p}) for p in PHASES},
            "spawned": get("cfn_agent_spawn_seconds_count"),
            "stopped": get("cfn_agent_exits_total", {"reason": "stopped"}),
            "latencies": get("cfn_task_latency_seconds_count"),
            "sent": get("cfn_messages_sent_total"),
            "delivered": get("cfn_messages_delivered_total"),
            "rate": get("cfn_delivery_rate"),
            "alive": get("cfn_agents"),
            "failures": get("cfn_task_failures_total"),
            "retries": get("cfn_task_retries_total"),
            "dead": get("cfn_messages_dead_lettered_total"),
        }
    assert result.ok
    assert values == {
        "rounds": 2,
        "phases": {p: 2 for p in PHASES},
        "spawned": 6,  # the baseline starts fresh agents every round
        "stopped": 6,
        "latencies": 6,
        "sent": 12,
        "delivered": 12,
        "rate": 1.0,
        "alive": 0,
        "failures": 0,
        "retries": 0,
        "dead": 0,
    }


def test_failed_tasks_are_counted_like_the_summary(make_config, no_leaks):
    config = make_config(workload={"agents": 2, "handler": "json:loads"})
    with Coordinator(config) as coord:
        result = coord.run(["[1]", "nope", "{}", "also nope"])
        failures = coord.ctx.metrics.registry.get_sample_value("cfn_task_failures_total")
    assert result.failed == 2
    assert failures == 2


class FlushBreaks:
    name = "flushbreaks"

    @hookimpl
    def cfn_flush(self, ctx, reason):
        raise OSError("flusher thread died")


def test_fallbacks_are_counted_per_hook_and_plugin(make_config, no_leaks):
    config = make_config(workload={"agents": 2})
    with Coordinator(config, extra_plugins=[FlushBreaks()]) as coord:
        result = coord.run()
        count = coord.ctx.metrics.registry.get_sample_value(
            "cfn_fallbacks_total", {"hook": "cfn_flush", "plugin": "flushbreaks"}
        )
    assert result.ok
    assert [(f["hook"], f["plugin"]) for f in result.fallbacks] == [("cfn_flush", "flushbreaks")]
    assert count == result.fallbacks[0]["count"] >= 1
