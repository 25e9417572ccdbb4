"""The ``prometheus_client`` collector: a snapshot of the database turned into metric
families at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.db import connection
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from ..conf import app_settings
from .snapshot import (
    BANDS,
    DEFAULT_WINDOW_SECONDS,
    FAILED_JOB_REASONS,
    FINAL_STATUSES,
    OPEN_STATUSES,
    REASONS,
    Snapshot,
    read_snapshot,
)


class ContainerJobCollector:
    """A ``prometheus_client`` collector of the queue's figures, read at each scrape.

    ``window_seconds`` is the span the figures over time cover (attempts ended, jobs
    finished, takeovers, the latency and duration histograms).
    """

    def __init__(self, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> None:
        window = float(window_seconds)
        if not window > 0 or window == float("inf"):
            raise ValueError(f"window_seconds must be a positive number, not {window_seconds!r}")
        self.window_seconds = window

    def describe(self) -> Iterable[Metric]:
        """The families without reading the database (registering costs no query)."""
        return list(_families(Snapshot(self.window_seconds)))

    def collect(self) -> Iterable[Metric]:
        # A scrape served by prometheus_client's own server runs in a new thread each time:
        # a connection opened for it is closed after it, one already open is left alone.
        opened_here = connection.connection is None
        try:
            snapshot = read_snapshot(self.window_seconds)
        finally:
            if opened_here and not connection.in_atomic_block:
                connection.close()
        return list(_families(snapshot))


# -- the families ---------------------------------------------------------------------------


def _families(snapshot: Snapshot) -> Iterator[Metric]:
    yield from _queue_families(snapshot)
    yield from _host_families(snapshot)
    yield from _attempt_families(snapshot)
    window = GaugeMetricFamily(
        "dcc_metrics_window_seconds",
        "The span, in seconds, that the figures over time cover (attempts ended, jobs "
        "finished, takeovers, the histograms).",
        value=snapshot.window_seconds,
    )
    yield window


def _queue_families(snapshot: Snapshot) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "dcc_queue_depth",
        "Jobs not yet final, by status, priority band (high >= 80, low <= 20) and lane.",
        labels=["status", "priority_band", "lane"],
    )
    lanes = sorted({lane for _status, _band, lane in snapshot.depth} | {""})
    for status in OPEN_STATUSES:
        for band in BANDS:
            for lane in lanes:
                depth.add_metric(
                    [status.value, band, lane], snapshot.depth.get((status.value, band, lane), 0)
                )
    yield depth
    ready = GaugeMetricFamily(
        "dcc_ready_jobs",
        "Waiting jobs that are due and unclaimed: what starts as soon as a slot is free.",
        labels=["priority_band", "lane"],
    )
    for band in BANDS:
        for lane in lanes:
            ready.add_metric([band, lane], snapshot.ready.get((band, lane), 0))
    yield ready
    age = GaugeMetricFamily(
        "dcc_oldest_ready_job_age_seconds",
        "Seconds the longest-waiting ready job has been ready (since it was queued, or "
        "since its schedule or retry back-off came due), by priority band; 0 when none.",
        labels=["priority_band"],
    )
    for band in BANDS:
        age.add_metric([band], snapshot.oldest_ready_age.get(band, 0.0))
    yield age
    finished = GaugeMetricFamily(
        "dcc_jobs_finished",
        "Jobs that reached a final status inside the window, by that status.",
        labels=["status"],
    )
    for status in FINAL_STATUSES:
        finished.add_metric([status.value], snapshot.finished.get(status.value, 0))
    yield finished
    yield GaugeMetricFamily(
        "dcc_takeovers",
        "Takeovers (rescues of a launch or run whose owner's lease expired) of the jobs "
        "not yet final and of those finished inside the window.",
        value=snapshot.takeovers,
    )
    failed = GaugeMetricFamily(
        "dcc_failed_jobs",
        "Jobs that failed inside the window, by how their last attempt ended ('none': "
        "failed without an attempt, e.g. refused as bigger than every host).",
        labels=["reason"],
    )
    for reason in FAILED_JOB_REASONS:
        failed.add_metric([reason], snapshot.failed_jobs.get(reason, 0))
    yield failed


def _host_families(snapshot: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "dcc_slots_used",
        "Jobs holding a slot (launching, running, or ended with a container still to "
        "stop) on every host, the default Docker host included.",
        value=snapshot.slots_used,
    )
    yield GaugeMetricFamily(
        "dcc_slots_limit",
        "The global limit on jobs holding a slot (MAX_CONCURRENT_JOBS).",
        value=app_settings.MAX_CONCURRENT_JOBS,
    )
    gauges: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
        (
            "dcc_host_slots_used",
            "Jobs holding a slot on the host.",
            lambda host: host["used_slots"],
        ),
        (
            "dcc_host_slots",
            "Jobs the host may run at once (max_concurrent_jobs).",
            lambda host: host["max_concurrent_jobs"],
        ),
        (
            "dcc_host_memory_used_mb",
            "MiB the jobs holding the host's slots count for (their memory_limit, or "
            "DEFAULT_JOB_MEMORY_MB).",
            lambda host: host["used_memory_mb"],
        ),
        (
            "dcc_host_memory_capacity_mb",
            "MiB the host's jobs may use together; only hosts that declare it.",
            lambda host: host["memory_capacity_mb"],
        ),
        (
            "dcc_host_cpus_used",
            "Cores the jobs holding the host's slots count for (their cpu_limit, or "
            "DEFAULT_JOB_CPUS).",
            lambda host: host["used_cpus"],
        ),
        (
            "dcc_host_cpu_capacity",
            "Cores the host's jobs may use together; only hosts that declare it.",
            lambda host: host["cpu_capacity"],
        ),
        (
            "dcc_host_active",
            "1 when the host takes new jobs (is_active), else 0.",
            lambda host: 1.0 if host["is_active"] else 0.0,
        ),
        (
            "dcc_host_reachable",
            "0 while the host's daemon does not answer (unreachable_since is set), else 1.",
            lambda host: 0.0 if host["unreachable_since"] is not None else 1.0,
        ),
        (
            "dcc_host_healthy",
            "0 while the host is unhealthy (HOST_FAILURES_BEFORE_UNHEALTHY failed calls in a "
            "row; no job starts there), else 1.",
            lambda host: 0.0 if host["unhealthy_since"] is not None else 1.0,
        ),
    ]
    for name, documentation, value_of in gauges:
        family = GaugeMetricFamily(name, documentation, labels=["host"])
        for host in snapshot.hosts:
            value = value_of(host)
            if value is not None:
                family.add_metric([str(host["name"])], float(value))
        yield family


def _attempt_families(snapshot: Snapshot) -> Iterator[Metric]:
    latency = snapshot.claim_to_start
    yield HistogramMetricFamily(
        "dcc_claim_to_start_seconds",
        "Seconds from an attempt's claim to its container's start, for attempts that "
        "started inside the window (ended or still running).",
        buckets=latency.buckets(),
        sum_value=latency.sum_seconds,
    )
    duration = snapshot.run_duration
    yield HistogramMetricFamily(
        "dcc_run_duration_seconds",
        "Seconds from a container's start to the end of its attempt, for attempts that "
        "ended inside the window.",
        buckets=duration.buckets(),
        sum_value=duration.sum_seconds,
    )
    yield GaugeMetricFamily(
        "dcc_attempts_succeeded",
        "Attempts that ended inside the window with exit code 0.",
        value=snapshot.succeeded,
    )
    failures = GaugeMetricFamily(
        "dcc_attempt_failures",
        "Attempts that ended inside the window other than with exit code 0, by reason "
        "(exited: a non-zero exit code) and whether the job was retried.",
        labels=["reason", "retried"],
    )
    for reason in REASONS:
        for retried in (False, True):
            value = snapshot.failures.get((reason, retried), 0)
            failures.add_metric([reason, "true" if retried else "false"], value)
    yield failures
