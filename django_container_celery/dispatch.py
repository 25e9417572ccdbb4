"""Where dispatch decides which jobs get a run message, and when.

A run message is a right to start one job on its route (see ``claims.py``: its claim
takes the best ready job that fits a free slot). Dispatch keeps enough of them in flight
and no more: each of the first ready jobs that fit the free capacity, in claim order, has
one message in flight. ``dispatched_at`` on the row says a message is in flight; it is
cleared when a message is used without claiming its own job (``forget``), when an attempt
ends, and it is ignored once older than ``REDISPATCH_SECONDS`` (the message is presumed
lost: the broker was down, or a worker died holding it).

``delay()`` sends the first message of a job as its transaction commits; beat's
``dispatch_ready_jobs`` and the watchers, after each job ends, call ``due_jobs`` for the
rest: scheduled jobs whose time has come, retries whose back-off is over, lost messages.
The Celery side (sending) is in ``api.send_run_message``; nothing here imports Celery.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.db.models import F, FloatField, Q, QuerySet, Value
from django.db.models.functions import Coalesce

from . import claims, placement, states
from .conf import app_settings
from .exceptions import TransitionConflict
from .finishing import announce
from .models import ContainerJob, database_now
from .placement import CPU_SLACK, HostRoom, Need
from .states import Status


def due_jobs(max_concurrent: int | None = None) -> list[ContainerJob]:
    """Ready jobs to send run messages for now, best first, each marked as sent.

    A job qualifies when it is among the jobs a claim would take next within the free
    capacity and no message is in flight for it. One conditional UPDATE per job marks it,
    so two dispatchers never send the same job at once. Jobs that no host can ever hold
    are failed first (``refuse_unfittable``).
    """
    refuse_unfittable()
    limit = app_settings.MAX_CONCURRENT_JOBS if max_concurrent is None else max_concurrent
    free = limit - ContainerJob.objects.holding_slots().count()
    ids = claims.eligible_ready_ids(free)
    if not ids:
        return []
    return _mark_sent(ids)


def refuse_unfittable(limit: int = 100) -> int:
    """Fail waiting jobs bigger than every active host they may run on; returns how many.

    Validation refuses such a job when it is saved, but hosts may shrink or be switched off
    later. Waiting would then never end, so the job fails with the reason, like a launch
    that the daemon refuses for good.
    """
    rooms = placement.host_rooms()
    candidates = _too_big_query(rooms)
    if candidates is None:
        return 0
    refused = 0
    for job in candidates[:limit]:
        _field, reason = placement.too_big(Need.of_job(job), job.docker_host_id, rooms)
        if reason and _refuse(job, f"refused: this job {reason}"):
            refused += 1
    return refused


def _too_big_query(rooms: Sequence[HostRoom]) -> QuerySet[ContainerJob] | None:
    """Waiting jobs that may be too big for every host they may use, by the rule of
    ``placement.too_big`` (switched-off hosts included), or None when no host counts
    resources. Each is checked once more before it is refused."""
    counted = [room for room in rooms if room.counts_resources]
    if not counted:
        return None
    beyond = {room.host_id: _beyond(room) for room in counted}
    wanted = Q(pk__in=[])
    for host_id, condition in beyond.items():
        wanted |= Q(docker_host_id=host_id) & condition
    if len(counted) == len(rooms):
        unpinned = Q(docker_host__isnull=True)
        for condition in beyond.values():
            unpinned &= condition
        wanted |= unpinned
    need_memory = Coalesce(F("memory_limit"), Value(app_settings.DEFAULT_JOB_MEMORY_MB))
    need_cpus = Coalesce(
        F("cpu_limit"), Value(float(app_settings.DEFAULT_JOB_CPUS)), output_field=FloatField()
    )
    return (
        ContainerJob.objects.filter(status__in=states.WAITING, claimed_by="")
        .annotate(need_memory=need_memory, need_cpus=need_cpus)
        .filter(wanted)
        .order_by("queued_at", "id")
    )


def _beyond(room: HostRoom) -> Q:
    """The job needs more than this host holds even when empty."""
    condition = Q()
    if room.memory_mb is not None:
        condition |= Q(need_memory__gt=room.memory_mb)
    if room.cpus is not None:
        condition |= Q(need_cpus__gt=room.cpus + CPU_SLACK)
    return condition


def _refuse(job: ContainerJob, reason: str) -> bool:
    now = database_now()
    try:
        job.transition_to(
            Status.FAILED,
            last_error=reason,
            last_error_at=now,
            completed_at=now,
            dispatched_at=None,
            # An earlier attempt's exit code would read as this refusal's outcome.
            exit_code=None,
        )
    except TransitionConflict:
        return False  # claimed or changed meanwhile: the next pass looks again
    announce(job)
    return True


def forget(job_id: Any) -> None:
    """A message for this job was used without claiming it: the job may get a new one."""
    ContainerJob.objects.filter(pk=job_id, claimed_by="").update(dispatched_at=None)


def _mark_sent(ids: Sequence[Any]) -> list[ContainerJob]:
    now = database_now()
    stale = now - timedelta(seconds=app_settings.REDISPATCH_SECONDS)
    unsent = Q(status__in=states.WAITING) & (
        Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=stale)
    )
    # Usually every candidate still has its message in flight: one read finds that,
    # instead of one UPDATE per candidate that matches nothing.
    wanted = {
        _as_uuid(pk)
        for pk in ContainerJob.objects.filter(Q(pk__in=ids) & unsent).values_list("pk", flat=True)
    }
    marked = [
        job_id
        for job_id in ids
        if _as_uuid(job_id) in wanted
        and ContainerJob.objects.filter(Q(pk=job_id) & unsent).update(dispatched_at=now)
    ]
    if not marked:
        return []
    jobs = ContainerJob.objects.filter(pk__in=marked).select_related("docker_host")
    order = {_as_uuid(job_id): index for index, job_id in enumerate(marked)}
    return sorted(jobs, key=lambda job: order[job.pk])


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
