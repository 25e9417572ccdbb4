"""What a scrape reports, read from the database: queue depth, hosts, the attempt history
over the window. Every figure is one indexed query with GROUP BY or conditional
aggregates, by the database's clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

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
from prometheus_client.utils import floatToGoString

from .. import states
from ..conf import app_settings
from ..models import (
    PRIORITY_HIGH,
    PRIORITY_LOW,
    AttemptReason,
    ContainerJob,
    ExecutorHost,
    JobAttempt,
    database_now,
)
from ..states import Status

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
        "unhealthy_since",
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
