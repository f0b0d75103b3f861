"""Prometheus metrics of the node (prometheus-client), exposed by the status server.

One registry per :class:`NodeMetrics` so tests can run several nodes in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "msfn_associations", "Associations by outcome", ["outcome"], registry=r
        )
        self.instances_received = Counter(
            "msfn_instances_received", "Instances stored (duplicates excluded)", registry=r
        )
        self.instances_refused = Counter(
            "msfn_instances_refused", "C-STORE requests refused, by reason", ["reason"], registry=r
        )
        self.bytes_received = Counter(
            "msfn_bytes_received", "Bytes received in C-STORE", registry=r
        )
        self.jobs = Gauge("msfn_jobs", "Jobs by state", ["state"], registry=r)
        self.stage_seconds = Histogram(
            "msfn_stage_seconds",
            "Duration of job stages",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.forecast_seconds = Histogram(
            "msfn_forecast_seconds", "Forecast time per study", buckets=STAGE_BUCKETS, registry=r
        )
        self.outbox_depth = Gauge(
            "msfn_outbox_depth", "Outbox objects by state", ["state"], registry=r
        )
        self.failures = Counter(
            "msfn_failures", "Failed jobs and deliveries, by reason", ["reason"], registry=r
        )
        self.objects_sent = Counter("msfn_objects_sent", "Result objects delivered", registry=r)
