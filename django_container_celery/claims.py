"""Where a job is claimed: one atomic UPDATE that takes a waiting job for one worker.

A claim moves the job to ``launching``, records the worker (``claimed_by``), a lease that
expires, the next attempt number and the host the attempt will run on. It lives in the
row, not in a transaction, so it survives the claiming transaction; a worker renews its
lease while it follows the job, and a job whose lease expired may be taken over.

Which job a claim takes is decided here too, never by the order Celery delivers messages
in: a run message is a right to start one job on its route (the Celery queue it was sent
to), and its claim takes the first ready job, by priority then FIFO, among the jobs that
fit a free slot and share that route (``claim_next(route_of=...)``). Messages may arrive in
any order, be prefetched, duplicated or sent by dispatch, a rescue or a canvas step: the
job that starts when a slot frees is always the best one waiting for it.

Capacity (the global ``max_concurrent`` and each host's ``max_concurrent_jobs``) is
checked inside the same UPDATE. On PostgreSQL every claim first takes one transaction-level
advisory lock, so claims are serialized and each UPDATE's snapshot sees all earlier claims:
no two workers can both take the last free slot. SQLite runs the same single statement; it
serializes writers by itself.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, Q
from django.db.models.functions import Now
from django.utils import timezone

from . import states
from .conf import app_settings
from .models import ContainerJob, ExecutorHost, database_now
from .states import Status

# Arbitrary constant naming the app's advisory lock ("dcc" in ASCII plus a version digit).
CLAIM_LOCK_KEY = 0x646363_01
UNLIMITED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class HostLoad:
    host_id: int
    capacity: int
    weight: int
    active: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.active)


def lease_deadline(now: datetime | None = None) -> datetime:
    """When a lease taken or renewed now expires, by the database's clock."""
    return (now or database_now()) + timedelta(seconds=app_settings.LEASE_SECONDS)


def host_loads(include_inactive: bool = False) -> list[HostLoad]:
    """Capacity and current load (launching + running jobs) of the hosts, in one query."""
    active = Q(assigned_jobs__status__in=states.ACTIVE) | Q(assigned_jobs__stop_pending=True)
    hosts = ExecutorHost.objects.order_by("pk")
    if not include_inactive:
        hosts = hosts.filter(is_active=True)
    rows = hosts.annotate(load=Count("assigned_jobs", filter=active)).values_list(
        "id", "max_concurrent_jobs", "weight", "is_active", "load"
    )
    return [
        HostLoad(pk, cap if is_active else 0, weight, load)
        for pk, cap, weight, is_active, load in rows
    ]


def choose_host(loads: Sequence[HostLoad]) -> int | None:
    """The host for a job without one: most free slots weighted by the host's weight."""
    candidates = [load for load in loads if load.free > 0]
    if not candidates:
        return None
    best = max(candidates, key=lambda load: (load.free * load.weight, load.weight, -load.host_id))
    return best.host_id


class _ClaimSQL:
    """Builds the claiming UPDATE for the current database."""

    def __init__(self) -> None:
        self.job = ContainerJob._meta.db_table
        self.host = ExecutorHost._meta.db_table
        self.postgres = connection.vendor == "postgresql"

    def statuses(self, values: Iterable[str]) -> str:
        return ", ".join(f"'{value}'" for value in sorted(values))

    def update(
        self,
        *,
        target: str,
        target_params: list[Any],
        worker_id: str,
        default_host: int | None,
        max_concurrent: int,
        now: datetime,
    ) -> tuple[str, list[Any]]:
        """The UPDATE ... RETURNING that claims the row chosen by ``target``.

        ``target`` is a SQL expression for the id to claim; the capacity checks are part of
        the WHERE clause so the statement claims nothing when there is no room.
        """
        # Slots are held by active jobs and by ended ones whose container still runs.
        active = f"a.status IN ({self.statuses(states.ACTIVE)}) OR a.stop_pending"
        job, host = self.job, self.host
        # The host the attempt will run on: the pinned one, else the chosen default.
        run_host = f"COALESCE({job}.docker_host_id, %s)"
        sql = f"""
            UPDATE {job} SET
                status = 'launching',
                claimed_by = %s,
                claimed_at = %s,
                lease_expires_at = %s,
                attempt = {job}.attempt + 1,
                assigned_host_id = {run_host},
                celery_task_id = CASE WHEN {job}.celery_task_id = '' THEN %s
                                      ELSE {job}.celery_task_id END,
                launched_at = NULL,
                started_at = NULL,
                completed_at = NULL,
                exit_code = NULL,
                execution_id = '',
                updated_at = %s
            WHERE {job}.id = ({target})
              AND (SELECT COUNT(*) FROM {job} a WHERE {active}) < %s
              AND (
                {run_host} IS NULL
                OR (SELECT COUNT(*) FROM {job} a
                    WHERE ({active}) AND a.assigned_host_id = {run_host})
                   < (SELECT h.max_concurrent_jobs FROM {host} h
                      WHERE h.id = {run_host} AND h.is_active)
              )
            RETURNING *
        """
        params: list[Any] = [
            worker_id,
            _db_time(now),
            _db_time(lease_deadline(now)),
            default_host,
            # A job queued without a message (admin, API) gets the id its result goes under.
            str(uuid.uuid4()),
            _db_time(now),
            *target_params,
            max_concurrent,
            default_host,
            default_host,
            default_host,
        ]
        return sql, params

    def ready_ids(
        self,
        *,
        now: datetime,
        free_hosts: list[int] | None,
        default_host: int | None,
        exclude_ids: Sequence[Any] = (),
        limit: int = 1,
        lock: bool = True,
        only_id: Any = None,
        route_of: Route | None = None,
    ) -> tuple[str, list[Any]]:
        """SELECT of the first ready job ids, in launch order, that could run now.

        ``free_hosts`` None means no ExecutorHost rows exist: every job may run.
        ``route_of`` keeps the jobs pinned to that route's host (or unpinned ones).
        """
        waiting = self.statuses(states.WAITING)
        sql = f"""
            SELECT r.id FROM {self.job} r
            WHERE r.status IN ({waiting})
              AND r.claimed_by = ''
              AND NOT r.stop_pending
              AND (r.scheduled_for IS NULL OR r.scheduled_for <= %s)
        """
        params: list[Any] = [_db_time(now)]
        if only_id is not None:
            sql += " AND r.id = %s"
            params.append(only_id)
        if route_of is not None:
            if route_of.host_id is None:
                sql += " AND r.docker_host_id IS NULL"
            else:
                sql += " AND r.docker_host_id = %s"
                params.append(route_of.host_id)
        if free_hosts is not None:
            pinned = "r.docker_host_id IN ({})".format(
                ", ".join(["%s"] * len(free_hosts)) if free_hosts else "NULL"
            )
            params.extend(free_hosts)
            if default_host is not None:
                sql += f" AND (r.docker_host_id IS NULL OR {pinned})"
            else:
                sql += f" AND {pinned}"
        if exclude_ids:
            sql += " AND r.id NOT IN ({})".format(", ".join(["%s"] * len(exclude_ids)))
            params.extend(_db_id(pk) for pk in exclude_ids)
        sql += " ORDER BY r.priority DESC, r.queued_at, r.id LIMIT %s"
        params.append(limit)
        if lock and self.postgres:
            sql += " FOR UPDATE SKIP LOCKED"
        return sql, params


def _db_time(value: datetime) -> Any:
    """A datetime as the backend stores it (SQLite keeps naive UTC text)."""
    return connection.ops.adapt_datetimefield_value(value)


def _db_id(pk: Any) -> Any:
    """Job ids as the database driver wants them (SQLite stores UUIDs as hex)."""
    if connection.vendor == "sqlite":
        return ContainerJob._meta.pk.get_db_prep_value(pk, connection)
    return pk


def _serialize_claims() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CLAIM_LOCK_KEY])


def _placement() -> tuple[list[int] | None, int | None]:
    """(hosts with a free slot or None when there are no hosts, host for unpinned jobs)."""
    loads = host_loads(include_inactive=True)  # inactive ones have no capacity
    if not loads:
        return None, None
    return [load.host_id for load in loads if load.free > 0], choose_host(loads)


def _run_claim(sql: str, params: list[Any]) -> ContainerJob | None:
    rows = list(ContainerJob.objects.raw(sql, params))
    return rows[0] if rows else None


Target = tuple[str, list[Any]]


def _claim(
    worker_id: str,
    max_concurrent: int | None,
    choose: Callable[[_ClaimSQL, datetime, list[int] | None, int | None], Target],
) -> ContainerJob | None:
    """Run one claim: serialize, place, then the UPDATE of the row ``choose`` selects."""
    limit = app_settings.MAX_CONCURRENT_JOBS if max_concurrent is None else max_concurrent
    with transaction.atomic():
        _serialize_claims()
        now = database_now()  # after the wait for the lock, so the lease is not shortened
        free_hosts, default_host = _placement()
        builder = _ClaimSQL()
        chosen = choose(builder, now, free_hosts, default_host)
        sql, params = builder.update(
            target=chosen[0],
            target_params=chosen[1],
            worker_id=worker_id,
            default_host=default_host,
            max_concurrent=limit,
            now=now,
        )
        return _run_claim(sql, params)


def claim_next(
    worker_id: str,
    max_concurrent: int | None = None,
    exclude_ids: Sequence[Any] = (),
    route_of: Any = None,
) -> ContainerJob | None:
    """Claim the first ready job (priority, then FIFO) that has room to run, or None.

    ``route_of`` is the job a run message was sent for: the claim then takes the best job
    among those whose messages share its queue, which is often that job itself but is a
    better one when a better one waits. A worker consuming a queue can reach the hosts of
    every job routed to it, so any of them may be launched from here.
    """
    route: Route | None = None
    if route_of is not None and app_settings.PER_HOST_QUEUES:
        route = _route_of(route_of)
        if route is None:
            return None  # its job is gone: which queue it came from is unknown

    def first_ready(
        builder: _ClaimSQL, now: datetime, free: list[int] | None, default: int | None
    ) -> Target:
        return builder.ready_ids(
            now=now, free_hosts=free, default_host=default, exclude_ids=exclude_ids, route_of=route
        )

    return _claim(worker_id, max_concurrent, first_ready)


@dataclasses.dataclass(frozen=True)
class Route:
    """The jobs a queue serves with ``PER_HOST_QUEUES``: those pinned to ``host_id``, or
    the unpinned ones when it is None."""

    host_id: int | None


def _route_of(job_id: Any) -> Route | None:
    """The route of a message sent for this job, read from the job's row (None: no row)."""
    rows = ContainerJob.objects.filter(pk=job_id).values_list("docker_host_id", flat=True)
    for host_id in rows:
        return Route(host_id)
    return None


def claim_job(
    job_id: Any,
    worker_id: str,
    max_concurrent: int | None = None,
) -> ContainerJob | None:
    """Claim exactly this job if it is ready and there is room, else None.

    For callers that name the job to launch (``launch_job``, eager mode); run messages
    use ``claim_next(route_of=...)`` so that priority, not delivery order, decides.
    """

    def this_job(
        builder: _ClaimSQL, now: datetime, free: list[int] | None, default: int | None
    ) -> Target:
        return builder.ready_ids(
            now=now, free_hosts=free, default_host=default, only_id=_db_id(job_id)
        )

    return _claim(worker_id, max_concurrent, this_job)


def eligible_ready_ids(limit: int) -> list[Any]:
    """Ids of the first ``limit`` ready jobs that a claim would take, in claim order.

    Uses the same placement rules as the claim itself, so dispatch never sends a message
    for a job that a claim would refuse (for example one pinned to a full host).
    """
    if limit <= 0:
        return []
    free_hosts, default_host = _placement()
    sql, params = _ClaimSQL().ready_ids(
        now=database_now(),
        free_hosts=free_hosts,
        default_host=default_host,
        limit=limit,
        lock=False,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        to_python = ContainerJob._meta.pk.to_python
        return [to_python(row[0]) for row in cursor.fetchall()]


def take_over(job_id: Any, worker_id: str) -> ContainerJob | None:
    """Take a launching or running job whose lease expired; keep its attempt number.

    The new owner then looks for the attempt's container by its deterministic name.
    Expiry is judged by the database's clock, so a worker whose clock runs fast cannot
    take over a lease that is still alive.
    """
    now = database_now()
    updated = ContainerJob.objects.filter(
        pk=job_id, status__in=states.ACTIVE, lease_expires_at__lt=Now()
    ).update(claimed_by=worker_id, claimed_at=now, lease_expires_at=lease_deadline(now))
    if not updated:
        return None
    job = ContainerJob.objects.select_related("assigned_host", "docker_host").get(pk=job_id)
    # Another rescuer may have taken it between our UPDATE and this read.
    return job if job.claimed_by == worker_id else None


def on_host(host_id: int | None) -> Q:
    """Jobs whose current attempt runs on this host (None: on the default Docker host)."""
    return Q(assigned_host__isnull=True) if host_id is None else Q(assigned_host_id=host_id)


def stale_job_ids(limit: int = 100, host_id: Any = ...) -> list[Any]:
    """Jobs holding a slot whose lease expired (by the database's clock): their worker,
    or the watcher that led their host, is presumed dead. ``host_id`` narrows to one host
    (None: the default host)."""
    jobs = ContainerJob.objects.filter(status__in=states.ACTIVE, lease_expires_at__lt=Now())
    if host_id is not ...:
        jobs = jobs.filter(on_host(host_id))
    return list(jobs.order_by("lease_expires_at").values_list("pk", flat=True)[:limit])


def watch_running(host_id: int | None, watcher_id: str) -> int:
    """Give the running jobs of a host to the watcher that leads it, lease renewed.

    One UPDATE: from here on the leader is the claimant that finishes them, and the lease
    says a watcher is alive. A launcher's claim ends once its container runs.
    """
    return ContainerJob.objects.filter(on_host(host_id), status=Status.RUNNING).update(
        claimed_by=watcher_id, lease_expires_at=lease_deadline()
    )


def renew_lease(job: ContainerJob) -> bool:
    """Extend one job's lease while the claim (owner, attempt) is still ours."""
    return job.update_as_claimant(lease_expires_at=lease_deadline())


def release(job: ContainerJob, error: str = "") -> None:
    """Give a claimed job back to the queue untouched (no container was started)."""
    fields: dict[str, Any] = {
        "claimed_by": "",
        "claimed_at": None,
        "lease_expires_at": None,
        "assigned_host": None,
        "dispatched_at": None,
    }
    if error:
        fields.update(last_error=error, last_error_at=timezone.now())
    job.transition_to(Status.QUEUED, as_claimant=True, **fields)
