"""Prometheus metrics of the queue, computed from the database at every scrape.

Install the ``prometheus`` extra, then either add :data:`metrics_view` (or
:class:`MetricsView` with options) to your ``urls.py``, or register
:class:`ContainerJobCollector` with ``prometheus_client``'s own registry and server.

Nothing is counted in process memory: each scrape reads the job table, the attempt history
(``JobAttempt``) and the hosts, so every worker, web process and restart reports the same
figures. Each query reads only what its figure is about (jobs not yet final, jobs holding
slots, attempts and finishes inside the window, failed jobs, the hosts) through an index,
and counts with GROUP BY and conditional aggregates in the database: the cost of a scrape
does not grow with the finished jobs kept in the table.

Figures over time (latency and duration histograms, failures, finishes, takeovers) cover a
sliding window (``window_seconds``, one hour by default), so their values go down as well
as up: read them as they are (``histogram_quantile(0.95, dcc_run_duration_seconds_bucket)``)
rather than through ``rate()``.
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - the message is tested by hiding the package
    raise ImportError(
        "django_container_celery.metrics needs the prometheus-client package, which the "
        "'prometheus' extra installs: pip install 'django-container-celery[prometheus]'"
    ) from exc

from .collector import ContainerJobCollector
from .snapshot import (
    CLAIM_TO_START_BUCKETS,
    DEFAULT_WINDOW_SECONDS,
    FAILED_JOB_REASONS,
    REASONS,
    RUN_DURATION_BUCKETS,
    Snapshot,
    read_snapshot,
)
from .view import PERMISSION, MetricsView, metrics_view

__all__ = [
    "CLAIM_TO_START_BUCKETS",
    "DEFAULT_WINDOW_SECONDS",
    "FAILED_JOB_REASONS",
    "PERMISSION",
    "REASONS",
    "RUN_DURATION_BUCKETS",
    "ContainerJobCollector",
    "MetricsView",
    "Snapshot",
    "metrics_view",
    "read_snapshot",
]
