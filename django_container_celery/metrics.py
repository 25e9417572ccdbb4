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

import dataclasses
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - the message is tested by hiding the package
    raise ImportError(
        "django_container_celery.metrics needs the prometheus-client package, which the "
        "'prometheus' extra installs: pip install 'django-container-celery[prometheus]'"
    ) from exc

from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.models import (
    Case,
    CharField,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    IntegerField,
    Min,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Greatest
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseForbidden
from django.views import View

from . import states
from .conf import app_settings
from .models import (
    PRIORITY_HIGH,
    PRIORITY_LOW,
    AttemptReason,
    ContainerJob,
    ExecutorHost,
    JobAttempt,
    database_now,
)
from .states import Status

__all__ = [
    "CLAIM_TO_START_BUCKETS",
    "DEFAULT_WINDOW_SECONDS",
    "PERMISSION",
    "RUN_DURATION_BUCKETS",
    "ContainerJobCollector",
    "MetricsView",
    "metrics_view",
]

DEFAULT_WINDOW_SECONDS = 3600.0
# Claim to start is an image pull at worst, usually well under a second.
CLAIM_TO_START_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0
)  # fmt: skip
# Container jobs run from seconds (a script) to a day (a batch).
RUN_DURATION_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
    43200.0, 86400.0,
)  # fmt: skip
PERMISSION = "django_container_celery.view_containerjob"
# Shorter tokens can be guessed; generate one with `python -c "import secrets;
# print(secrets.token_urlsafe(32))"`.
MIN_TOKEN_LENGTH = 24

BANDS = ("high", "normal", "low")
OPEN_STATUSES = (Status.PENDING, Status.QUEUED, Status.RETRYING, Status.LAUNCHING, Status.RUNNING)
FINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)
REASONS = tuple(reason.value for reason in AttemptReason)
# The reason of a failed job that has no attempt history: refused before any launch (too
# big for every host), or failed before the history was kept.
NO_ATTEMPT = "none"
# A cancel ends a job cancelled, never failed.
FAILED_JOB_REASONS = (*(r for r in REASONS if r != AttemptReason.CANCELLED), NO_ATTEMPT)


def _band_of_priority() -> Case:
    return Case(
        When(priority__gte=PRIORITY_HIGH, then=Value("high")),
        When(priority__lte=PRIORITY_LOW, then=Value("low")),
        default=Value("normal"),
        output_field=CharField(),
    )


def _lane_fields() -> list[str]:
    """``["lane"]`` once jobs have lanes, so the figures are split by lane from then on."""
    names = {field.name for field in ContainerJob._meta.concrete_fields}
    return ["lane"] if "lane" in names else []


@dataclasses.dataclass
class Histogram:
    """Cumulative bucket counts (one per bound, then +Inf) and the sum, in seconds."""

    bounds: tuple[float, ...]
    counts: list[int]
    total: int = 0
    sum_seconds: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, [0] * len(bounds))

    def add(self, row: Mapping[str, Any], span: str) -> None:
        """Add the aggregates :func:`_histogram` named after ``span``."""
        for index in range(len(self.bounds)):
            self.counts[index] += int(row[f"{span}_le_{index}"] or 0)
        self.total += int(row[f"{span}_count"] or 0)
        self.sum_seconds += _seconds(row[f"{span}_sum"])

    def buckets(self) -> list[tuple[str, float]]:
        counts = zip(self.bounds, self.counts, strict=True)
        pairs = [(floatToGoString(bound), float(count)) for bound, count in counts]
        return [*pairs, ("+Inf", float(self.total))]


@dataclasses.dataclass
class Snapshot:
    """Everything one scrape reports, read from the database."""

    window_seconds: float
    # (status, band, lane) -> jobs; (band, lane) -> ready jobs; band -> seconds
    depth: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)
    ready: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    oldest_ready_age: dict[str, float] = dataclasses.field(default_factory=dict)
    finished: dict[str, int] = dataclasses.field(default_factory=dict)
    takeovers: int = 0
    slots_used: int = 0
    hosts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    claim_to_start: Histogram = dataclasses.field(
        default_factory=lambda: Histogram.empty(CLAIM_TO_START_BUCKETS)
    )
    run_duration: Histogram = dataclasses.field(
        default_factory=lambda: Histogram.empty(RUN_DURATION_BUCKETS)
    )
    succeeded: int = 0
    failures: dict[tuple[str, bool], int] = dataclasses.field(default_factory=dict)
    failed_jobs: dict[str, int] = dataclasses.field(default_factory=dict)


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


def read_snapshot(window_seconds: float = DEFAULT_WINDOW_SECONDS) -> Snapshot:
    """Read every figure from the database, by its clock."""
    now = database_now()
    since = now - timedelta(seconds=window_seconds)
    snapshot = Snapshot(window_seconds)
    _read_open_jobs(snapshot, now, since)
    _read_finished_jobs(snapshot, since)
    _read_hosts(snapshot)
    _read_attempts(snapshot, since)
    _read_failed_jobs(snapshot, since)
    return snapshot


def _read_open_jobs(snapshot: Snapshot, now: datetime, since: datetime) -> None:
    """Depth, ready jobs, oldest ready age and takeovers of the jobs not yet final, in one
    GROUP BY; running jobs' claim-to-start times in one more."""
    lanes = _lane_fields()
    # As a claim sees it: waiting, due, unclaimed, no container left to stop.
    ready = Q(status__in=sorted(states.WAITING), claimed_by="", stop_pending=False) & (
        Q(scheduled_for__isnull=True) | Q(scheduled_for__lte=now)
    )
    # Ready since it was queued, or since its schedule or back-off came due: a job
    # scheduled for later has not been waiting before then.
    ready_since = Greatest("queued_at", Coalesce("scheduled_for", "queued_at"))
    rows = (
        ContainerJob.objects.filter(status__in=OPEN_STATUSES)
        .annotate(band=_band_of_priority())
        .values("status", "band", *lanes)
        .annotate(
            jobs=Count("pk"),
            ready=Count("pk", filter=ready),
            oldest_ready=Min(ready_since, filter=ready),
            takeovers=Sum("takeover_count"),
        )
        .order_by()
    )
    for row in rows:
        lane = str(row["lane"]) if lanes else ""
        band = str(row["band"])
        snapshot.depth[(str(row["status"]), band, lane)] = int(row["jobs"])
        key = (band, lane)
        snapshot.ready[key] = snapshot.ready.get(key, 0) + int(row["ready"])
        snapshot.takeovers += int(row["takeovers"] or 0)
        if row["oldest_ready"] is not None:
            age = max(0.0, (now - row["oldest_ready"]).total_seconds())
            snapshot.oldest_ready_age[band] = max(age, snapshot.oldest_ready_age.get(band, 0.0))
    # The attempts under way that started inside the window (ended ones are in the history).
    running = (
        ContainerJob.objects.filter(status=Status.RUNNING)
        .annotate(waited=_between("claimed_at", "started_at"))
        .aggregate(**_histogram("waited", CLAIM_TO_START_BUCKETS, _started_after_claim(since)))
    )
    snapshot.claim_to_start.add(running, "waited")


def _read_finished_jobs(snapshot: Snapshot, since: datetime) -> None:
    rows = (
        ContainerJob.objects.filter(status__in=FINAL_STATUSES, completed_at__gte=since)
        .values("status")
        .annotate(jobs=Count("pk"), takeovers=Sum("takeover_count"))
        .order_by()
    )
    for row in rows:
        snapshot.finished[str(row["status"])] = int(row["jobs"])
        snapshot.takeovers += int(row["takeovers"] or 0)


def _read_hosts(snapshot: Snapshot) -> None:
    """Slots, memory and CPU held per host (as claims count them) next to each host's
    capacity: the jobs holding slots, grouped by host, then the host rows."""
    memory = Coalesce(
        "memory_limit",
        Value(app_settings.DEFAULT_JOB_MEMORY_MB, output_field=IntegerField()),
        output_field=IntegerField(),
    )
    cpus = Coalesce(
        "cpu_limit",
        Value(float(app_settings.DEFAULT_JOB_CPUS), output_field=FloatField()),
        output_field=FloatField(),
    )
    # The same condition as the partial index dcc_holding_idx, so that index serves it.
    holding = (
        ContainerJob.objects.filter(Q(status__in=sorted(states.ACTIVE)) | Q(stop_pending=True))
        .values("assigned_host_id")
        .annotate(jobs=Count("pk"), memory=Sum(memory), cpus=Sum(cpus))
        .order_by()
    )
    used = {row["assigned_host_id"]: row for row in holding}
    snapshot.slots_used = sum(int(row["jobs"]) for row in used.values())
    hosts = ExecutorHost.objects.order_by("name").values(
        "pk",
        "name",
        "is_active",
        "unreachable_since",
        "max_concurrent_jobs",
        "memory_capacity_mb",
        "cpu_capacity",
    )
    for host in hosts:
        row: Mapping[str, Any] = used.get(host["pk"], {})
        snapshot.hosts.append(
            {
                **host,
                "used_slots": int(row.get("jobs") or 0),
                "used_memory_mb": int(row.get("memory") or 0),
                "used_cpus": float(row.get("cpus") or 0.0),
            }
        )


def _read_attempts(snapshot: Snapshot, since: datetime) -> None:
    """Endings by reason, and the claim-to-start and run-time histograms, of the attempts
    that ended inside the window: one pass over them, in one aggregate."""
    succeeded = Q(reason=AttemptReason.EXITED, exit_code=0)
    started = _started_after_claim(since)
    run = Q(started_at__isnull=False)
    endings: dict[str, Any] = {"succeeded": Count("pk", filter=succeeded)}
    for reason in REASONS:
        for retried in (False, True):
            ending = Q(reason=reason, retried=retried) & ~succeeded
            endings[f"{reason}_{retried}"] = Count("pk", filter=ending)
    row = (
        JobAttempt.objects.filter(ended_at__gte=since)
        .annotate(
            waited=_between("claimed_at", "started_at"),
            ran=_between("started_at", "ended_at"),
        )
        .aggregate(
            **endings,
            **_histogram("waited", CLAIM_TO_START_BUCKETS, started),
            **_histogram("ran", RUN_DURATION_BUCKETS, run),
        )
    )
    snapshot.succeeded += int(row["succeeded"] or 0)
    for reason in REASONS:
        for retried in (False, True):
            snapshot.failures[(reason, retried)] = int(row[f"{reason}_{retried}"] or 0)
    snapshot.claim_to_start.add(row, "waited")
    snapshot.run_duration.add(row, "ran")


def _read_failed_jobs(snapshot: Snapshot, since: datetime) -> None:
    """Jobs that failed inside the window by the reason of the attempt each points at (its
    last): the (status, completed_at) index bounds them by the window, however many
    failed jobs are kept, then one probe of the attempts' (job, attempt) index each."""
    last_reason = JobAttempt.objects.filter(
        job=OuterRef("pk"), attempt=OuterRef("attempt")
    ).order_by()
    rows = (
        ContainerJob.objects.filter(status=Status.FAILED, completed_at__gte=since)
        .annotate(
            last_reason=Coalesce(
                Subquery(last_reason.values("reason")[:1]),
                Value(NO_ATTEMPT),
                output_field=CharField(),
            )
        )
        .values("last_reason")
        .annotate(jobs=Count("pk"))
        .order_by()
    )
    for row in rows:
        snapshot.failed_jobs[str(row["last_reason"])] = int(row["jobs"])


def _started_after_claim(since: datetime) -> Q:
    """Started inside the window. A takeover moves ``claimed_at`` to itself: when that came
    after the start, the attempt's own claim time is unknown and it is left out."""
    return Q(started_at__gte=since, claimed_at__isnull=False) & Q(started_at__gte=F("claimed_at"))


def _between(start: str, end: str) -> ExpressionWrapper:
    return ExpressionWrapper(F(end) - F(start), output_field=DurationField())


def _histogram(span: str, bounds: Sequence[float], rows: Q) -> dict[str, Any]:
    """Aggregates over the annotation ``span`` of the ``rows``: how many are at most each
    bound, their count and their sum (keys prefixed with ``span``)."""
    aggregates: dict[str, Any] = {
        f"{span}_le_{index}": Count(
            "pk", filter=rows & Q(**{f"{span}__lte": timedelta(seconds=bound)})
        )
        for index, bound in enumerate(bounds)
    }
    aggregates[f"{span}_count"] = Count("pk", filter=rows)
    aggregates[f"{span}_sum"] = Sum(span, filter=rows)
    return aggregates


def _seconds(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value) / 1_000_000  # a backend that sums durations as microseconds


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


# -- the view ----------------------------------------------------------------------------------


class MetricsView(View):
    """The metrics in Prometheus' text format, for your ``urls.py``.

    Served to an active staff user who may view container jobs (the admin's own rule),
    and, when ``bearer_token`` is set, to a request carrying ``Authorization: Bearer
    <token>`` (a Prometheus server); anyone else gets 403. ``window_seconds`` is the
    collector's window.
    """

    http_method_names = ["get", "head", "options"]
    bearer_token: str = ""
    window_seconds: float = DEFAULT_WINDOW_SECONDS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Callable[..., HttpResponseBase]:
        token = initkwargs.get("bearer_token", cls.bearer_token)
        if not isinstance(token, str) or (token and len(token) < MIN_TOKEN_LENGTH):
            raise ImproperlyConfigured(
                f"MetricsView bearer_token must be a string of at least {MIN_TOKEN_LENGTH} "
                "characters (or empty: staff users only)"
            )
        # Fails here, when urls.py is loaded, rather than at the first scrape.
        ContainerJobCollector(initkwargs.get("window_seconds", cls.window_seconds))
        view = super().as_view(**initkwargs)
        # The view decides who may read it (a scraper has a token, not a session), so a
        # project's LoginRequiredMiddleware (Django 5.1+) must not send it to a login page.
        view.login_required = False  # type: ignore[attr-defined]
        return view

    def get(self, request: HttpRequest) -> HttpResponse:
        if not self.allowed(request):
            return HttpResponseForbidden(
                "Metrics need a staff user who may view container jobs, or the bearer token.",
                content_type="text/plain; charset=utf-8",
            )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ContainerJobCollector(self.window_seconds))
        response = HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
        response["Cache-Control"] = "no-store"
        return response

    def allowed(self, request: HttpRequest) -> bool:
        if self.bearer_token:
            scheme, _space, credentials = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode(), self.bearer_token.encode()
            ):
                return True
        user = getattr(request, "user", None)
        return bool(
            user is not None and user.is_active and user.is_staff and user.has_perm(PERMISSION)
        )


metrics_view = MetricsView.as_view()
