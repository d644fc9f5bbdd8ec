"""Prometheus metrics, owned by the coordinator.

Agents do not write metric files: they report their figures inside result
messages and the coordinator records them here.  Each :class:`Metrics` has its
own ``CollectorRegistry`` (several coordinators in one process, as in tests,
do not collide); plugins add their own metrics to ``ctx.metrics.registry``
under the ``cfn_<plugin>_`` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

PHASES = ("spawn", "ready", "distribute", "execute", "collect", "shutdown")

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The kernel's metrics.  Names are part of the public interface (the Grafana dashboard uses them)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.coordination_seconds = Histogram(
            "cfn_coordination_seconds", "Wall time of one coordination round", buckets=_SECONDS, registry=r
        )
        self.phase_seconds = Histogram(
            "cfn_phase_seconds", "Time per phase of a round", ["phase"], buckets=_SECONDS, registry=r
        )
        self.delivery_rate = Gauge("cfn_delivery_rate", "Delivered / planned messages of the last round", registry=r)
        self.messages_sent = Counter("cfn_messages_sent", "Workload messages put on the bus: tasks, results, mesh peer messages (as in the summary)", registry=r)
        self.messages_delivered = Counter("cfn_messages_delivered", "Workload messages that reached their receiver, counted as the summary counts them", registry=r)
        self.messages_dead_lettered = Counter(
            "cfn_messages_dead_lettered", "Malformed records set aside in dead-letter files", registry=r
        )
        self.spawn_seconds = Histogram(
            "cfn_agent_spawn_seconds", "Launch to ready of one agent", buckets=_SECONDS, registry=r
        )
        self.agents = Gauge("cfn_agents", "Agent processes alive", registry=r)
        self.agent_exits = Counter("cfn_agent_exits", "Agent processes that ended", ["reason"], registry=r)
        self.task_retries = Counter("cfn_task_retries", "Tasks re-run after their agent died or hung", registry=r)
        self.task_failures = Counter("cfn_task_failures", "Tasks reported failed", registry=r)
        self.fallbacks = Counter(
            "cfn_fallbacks", "Plugin steps that failed and ran the baseline instead", ["hook", "plugin"], registry=r
        )
        self.latency_seconds = Histogram(
            "cfn_task_latency_seconds", "Task sent to result received", buckets=_SECONDS, registry=r
        )

    def serve(self, port: int):
        """Serve /metrics on 127.0.0.1:``port`` (a daemon thread) and return the server."""
        try:
            server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            from .errors import ConfigError

            raise ConfigError(
                f"[run] metrics_port = {port}: cannot serve /metrics on 127.0.0.1:{port}: {exc.strerror}; "
                "choose another port"
            ) from None
        return server

    def write(self, path: str) -> None:
        """Write the text exposition format to ``path``."""
        write_to_textfile(path, self.registry)
