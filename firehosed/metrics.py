"""Prometheus metrics, named after the domain: account, firehose, channel, batch.

Counters are module-level (one process, one registry). Queue figures are read at scrape
time from the live queues through `QueueCollector`, so the hot path never updates them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

signals_accepted = Counter(
    "firehosed_signals_accepted", "Signals accepted and durable", ["account"], registry=REGISTRY
)
signals_rejected = Counter(
    "firehosed_signals_rejected", "Records rejected at ingest", ["account"], registry=REGISTRY
)
signals_duplicate = Counter(
    "firehosed_signals_duplicate",
    "Records whose id was already accepted inside the dedupe window",
    ["account"],
    registry=REGISTRY,
)
requests = Counter(
    "firehosed_http_requests", "Ingest requests answered", ["status"], registry=REGISTRY
)
batches_delivered = Counter(
    "firehosed_batches_delivered", "Batches delivered", ["firehose", "channel"], registry=REGISTRY
)
records_delivered = Counter(
    "firehosed_records_delivered", "Records delivered", ["firehose", "channel"], registry=REGISTRY
)
bytes_delivered = Counter(
    "firehosed_bytes_delivered", "Bytes delivered", ["firehose", "channel"], registry=REGISTRY
)
delivery_errors = Counter(
    "firehosed_delivery_errors",
    "Failed delivery attempts",
    ["firehose", "channel"],
    registry=REGISTRY,
)
batches_dead_lettered = Counter(
    "firehosed_batches_dead_lettered",
    "Batches moved to the dead-letter store after retry_for",
    ["firehose"],
    registry=REGISTRY,
)
records_quarantined = Counter(
    "firehosed_records_quarantined",
    "Corrupt queue frames (one record, or a request's records) set aside at recovery",
    ["firehose"],
    registry=REGISTRY,
)
catchup_sessions = Gauge(
    "firehosed_catchup_sessions", "Sessions held in catch-up rings", registry=REGISTRY
)
catchup_bytes = Gauge(
    "firehosed_catchup_bytes", "Signal bytes held in catch-up rings", registry=REGISTRY
)
catchup_evictions = Counter(
    "firehosed_catchup_evictions",
    "Sessions evicted from catch-up before their TTL (max_memory)",
    registry=REGISTRY,
)
catchup_replayed = Counter(
    "firehosed_catchup_replayed",
    "Buffered signals re-sent with the person on identification",
    ["firehose"],
    registry=REGISTRY,
)
fsync_seconds = Histogram(
    "firehosed_fsync_seconds",
    "Group commit write+fsync latency",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
alerts_sent = Counter(
    "firehosed_alerts_sent", "Alert e-mails sent", ["firehose", "kind"], registry=REGISTRY
)
alerts_failed = Counter(
    "firehosed_alerts_failed", "Alert e-mails the SMTP server did not take", registry=REGISTRY
)
disk_bytes = Gauge("firehosed_storage_bytes", "Bytes held in storage.dir", registry=REGISTRY)
# storage.backend = "jetstream": this process's view of the cluster.
cluster_connected = Gauge(
    "firehosed_jetstream_connected", "1 while connected to the JetStream cluster", registry=REGISTRY
)
cluster_members = Gauge(
    "firehosed_jetstream_members", "firehosed processes alive in the deployment", registry=REGISTRY
)
cluster_partitions = Gauge(
    "firehosed_jetstream_partitions_owned",
    "Session partitions this process owns (routes, keeps the catch-up rings of)",
    registry=REGISTRY,
)
archive_late = Gauge(
    "firehosed_archive_late",
    "1 while a daily archive is past its deliver_by time and not delivered",
    ["firehose"],
    registry=REGISTRY,
)

loop_lag = Histogram(
    "firehosed_event_loop_lag_seconds",
    "How late the event loop ran a timer due every 0.1 s (a stall delays every request)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
import_rows = Counter(
    "firehosed_import_rows",
    "Rows of import runs by outcome: imported, duplicate, errored",
    ["import", "outcome"],
    registry=REGISTRY,
)
import_run_seconds = Histogram(
    "firehosed_import_run_seconds",
    "Import runs from start to processed (or failed)",
    ["import"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)
import_last_success = Gauge(
    "firehosed_import_last_success_timestamp_seconds",
    "When an import task's last run was processed (epoch seconds)",
    ["import"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """What a firehose's queue holds right now."""

    firehose: str
    records: int
    bytes: int
    oldest_age: float
    dead_bytes: int


class QueueCollector(Collector):
    """Reports queued records, bytes, oldest age and dead bytes per firehose at scrape time."""

    def __init__(self, source: Callable[[], Iterable[QueueFigures]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        records = GaugeMetricFamily(
            "firehosed_queue_records", "Records queued, not yet delivered", labels=["firehose"]
        )
        size = GaugeMetricFamily(
            "firehosed_queue_bytes", "Bytes queued, not yet delivered", labels=["firehose"]
        )
        age = GaugeMetricFamily(
            "firehosed_queue_oldest_age_seconds",
            "Age of the oldest undelivered record",
            labels=["firehose"],
        )
        dead = GaugeMetricFamily(
            "firehosed_dead_letter_bytes",
            "Bytes kept out of delivery: dead-lettered batches and quarantined records",
            labels=["firehose"],
        )
        for q in self.source():
            records.add_metric([q.firehose], q.records)
            size.add_metric([q.firehose], q.bytes)
            age.add_metric([q.firehose], q.oldest_age)
            dead.add_metric([q.firehose], q.dead_bytes)
        yield from (records, size, age, dead)


@functools.cache
def requests_with(status: int) -> Counter:
    """The `requests` counter child for one status (cached: labels() costs a lock)."""
    return requests.labels(str(status))


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(REGISTRY)
