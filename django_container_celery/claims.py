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

A claim reads the hosts' room (``placement.py``: slots, memory, CPU, health) and the
lanes' (``lanes.py``: paused, or at their limit), selects the first ready job that fits a
free slot on a healthy host it may use and whose lane may start one, chooses the host for
an unpinned job, and then claims it with one conditional UPDATE that checks every limit
again: the global ``max_concurrent``, the host's ``max_concurrent_jobs`` and health, the
host's memory and CPU capacity, the lane's pause and its ``max_concurrent_jobs``. On
PostgreSQL every claim first takes one transaction-level advisory lock, so claims are
serialized and each UPDATE's snapshot sees all earlier claims: no two workers can both
take the last free slot, the last free MiB or a lane's last place. On SQLite the UPDATE's own
checks hold, since SQLite serializes writers by itself.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone

from . import lanes, placement, states
from .conf import app_settings
from .models import ContainerJob, ExecutorHost, Lane, database_now
from .placement import CPU_SLACK, HostRoom, Need, Reservation
from .states import Status

# Arbitrary constant naming the app's advisory lock ("dcc" in ASCII plus a version digit).
CLAIM_LOCK_KEY = 0x646363_01
UNLIMITED = 2**31 - 1


def lease_deadline(now: datetime | None = None) -> datetime:
    """When a lease taken or renewed now expires, by the database's clock."""
    return (now or database_now()) + timedelta(seconds=app_settings.LEASE_SECONDS)


class _ClaimSQL:
    """Builds the claiming UPDATE for the current database."""

    def __init__(self, blocked_lanes: Sequence[str] = ()) -> None:
        self.job = ContainerJob._meta.db_table
        self.host = ExecutorHost._meta.db_table
        self.lane = Lane._meta.db_table
        self.postgres = connection.vendor == "postgresql"
        # Lanes paused or at their limit as read under the claim's lock: their jobs are
        # left out of every selection (a paused lane's job reserves no host either).
        self.blocked_lanes = list(blocked_lanes)

    def statuses(self, values: Iterable[str]) -> str:
        return ", ".join(f"'{value}'" for value in sorted(values))

    def update(
        self,
        *,
        job_id: Any,
        host: HostRoom | None,
        worker_id: str,
        max_concurrent: int,
        now: datetime,
    ) -> tuple[str, list[Any]]:
        """The UPDATE ... RETURNING that claims ``job_id`` for ``host`` (None: no hosts).

        Every condition of the claim is in its WHERE clause, so the statement claims
        nothing when the job stopped waiting or there is no room any more.
        """
        # Slots are held by active jobs and by ended ones whose container still runs.
        holding = f"(a.status IN ({self.statuses(states.ACTIVE)}) OR a.stop_pending)"
        job, host_table = self.job, self.host
        still_ready, ready_params = self.ready_ids(
            now=now, rooms=None, only_id=job_id, lock=False, columns="r.id"
        )
        sql = f"""
            UPDATE {job} SET
                status = 'launching',
                claimed_by = %s,
                claimed_at = %s,
                lease_expires_at = %s,
                attempt = {job}.attempt + 1,
                assigned_host_id = %s,
                celery_task_id = CASE WHEN {job}.celery_task_id = '' THEN %s
                                      ELSE {job}.celery_task_id END,
                launched_at = NULL,
                started_at = NULL,
                completed_at = NULL,
                exit_code = NULL,
                execution_id = '',
                updated_at = %s
            WHERE {job}.id = ({still_ready})
              AND (SELECT COUNT(*) FROM {job} a WHERE {holding}) < %s
              AND NOT EXISTS (
                SELECT 1 FROM {self.lane} l WHERE l.name = {job}.lane AND l.is_paused
              )
              AND (
                {job}.lane = ''
                OR (SELECT COUNT(*) FROM {job} a WHERE {holding} AND a.lane = {job}.lane)
                   < COALESCE(
                       (SELECT l.max_concurrent_jobs FROM {self.lane} l
                        WHERE l.name = {job}.lane),
                       %s)
              )
        """
        params: list[Any] = [
            worker_id,
            _db_time(now),
            _db_time(lease_deadline(now)),
            host.host_id if host else None,
            # A job queued without a message (admin, API) gets the id its result goes under.
            str(uuid.uuid4()),
            _db_time(now),
            *ready_params,
            max_concurrent,
            UNLIMITED,
        ]
        if host is not None:
            on_host = f"FROM {job} a WHERE {holding} AND a.assigned_host_id = %s"
            sql += f"""
              AND (SELECT COUNT(*) {on_host})
                  < (SELECT h.max_concurrent_jobs FROM {host_table} h
                     WHERE h.id = %s AND h.is_active AND h.unhealthy_since IS NULL)
            """
            params += [host.host_id, host.host_id]
            for limit_column, capacity_column, default in self._resources():
                sql += f"""
              AND (
                (SELECT h.{capacity_column} FROM {host_table} h WHERE h.id = %s) IS NULL
                OR (SELECT COALESCE(SUM(COALESCE(a.{limit_column}, %s)), 0) {on_host})
                   + COALESCE({job}.{limit_column}, %s)
                   <= (SELECT h.{capacity_column} FROM {host_table} h WHERE h.id = %s) + %s
              )
                """
                slack = CPU_SLACK if limit_column == "cpu_limit" else 0
                params += [host.host_id, default, host.host_id, default, host.host_id, slack]
        sql += " RETURNING *"
        return sql, params

    @staticmethod
    def _resources() -> list[tuple[str, str, Any]]:
        """(job limit column, host capacity column, what a job without a limit counts)."""
        return [
            ("memory_limit", "memory_capacity_mb", app_settings.DEFAULT_JOB_MEMORY_MB),
            ("cpu_limit", "cpu_capacity", float(app_settings.DEFAULT_JOB_CPUS)),
        ]

    def ready_ids(
        self,
        *,
        now: datetime,
        rooms: Sequence[HostRoom] | None,
        reserved: Reservation | None = None,
        exclude_ids: Sequence[Any] = (),
        limit: int = 1,
        lock: bool = True,
        only_id: Any = None,
        route_of: Route | None = None,
        columns: str = "r.id",
    ) -> tuple[str, list[Any]]:
        """SELECT of the first ready jobs, in launch order, that fit a host now.

        ``rooms`` None means no ExecutorHost rows exist (or no host test is wanted): every
        job may run. ``reserved`` keeps its hosts for their own jobs. ``route_of`` keeps the
        jobs pinned to that route's host (or unpinned ones).
        """
        waiting = self.statuses(states.WAITING)
        sql = f"""
            SELECT {columns} FROM {self.job} r
            WHERE r.status IN ({waiting})
              AND r.claimed_by = ''
              AND NOT r.stop_pending
              AND (r.scheduled_for IS NULL OR r.scheduled_for <= %s)
        """
        params: list[Any] = [_db_time(now)]
        if only_id is not None:
            sql += " AND r.id = %s"
            params.append(only_id)
        if self.blocked_lanes:
            sql += " AND r.lane NOT IN ({})".format(", ".join(["%s"] * len(self.blocked_lanes)))
            params.extend(self.blocked_lanes)
        if route_of is not None:
            if route_of.host_id is None:
                sql += " AND r.docker_host_id IS NULL"
            else:
                sql += " AND r.docker_host_id = %s"
                params.append(route_of.host_id)
        if rooms is not None:
            fits, fit_params = self._fits_some_host(rooms, reserved)
            sql += f" AND {fits}"
            params += fit_params
        if exclude_ids:
            sql += " AND r.id NOT IN ({})".format(", ".join(["%s"] * len(exclude_ids)))
            params.extend(_db_id(pk) for pk in exclude_ids)
        sql += " ORDER BY r.priority DESC, r.queued_at, r.id LIMIT %s"
        params.append(limit)
        if lock and self.postgres:
            sql += " FOR UPDATE SKIP LOCKED"
        return sql, params

    def _fits_some_host(
        self, rooms: Sequence[HostRoom], reserved: Reservation | None
    ) -> tuple[str, list[Any]]:
        """A condition on ``r``: it may use a host that has room for it now."""
        clauses: list[str] = []
        params: list[Any] = []
        for room in rooms:
            if room.free_slots <= 0 or (reserved is not None and reserved.holds(room.host_id)):
                continue
            clause = "(r.docker_host_id IS NULL OR r.docker_host_id = %s)"
            params.append(room.host_id)
            free: dict[str, float | None] = {
                "memory_limit": room.free_memory_mb,
                "cpu_limit": room.free_cpus,
            }
            for limit_column, _capacity, default in self._resources():
                room_left = free[limit_column]
                if room_left is not None:
                    clause += f" AND COALESCE(r.{limit_column}, %s) <= %s"
                    slack = CPU_SLACK if limit_column == "cpu_limit" else 0
                    params += [default, room_left + slack]
            clauses.append(f"({clause})")
        if not clauses:
            return "1 = 0", []
        return "(" + " OR ".join(clauses) + ")", params


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


def _rooms() -> list[HostRoom] | None:
    """The hosts' room, or None when there are no ExecutorHost rows (the default host)."""
    return placement.host_rooms() or None


def _reservation(
    builder: _ClaimSQL,
    now: datetime,
    rooms: list[HostRoom] | None,
    lane_rooms: Sequence[lanes.LaneRoom] = (),
) -> Reservation | None:
    """The reservation of the first waiting job that fits no host now but could once one
    is free (``placement``), looked for only where a host counts resources: counting
    slots alone, a job that fits no host leaves no room to anyone else either."""
    if rooms is None or not any(room.counts_resources for room in rooms):
        return None
    sql, params = builder.ready_ids(
        now=now,
        rooms=None,
        lock=False,
        limit=placement.RESERVATION_SCAN,
        columns=_CANDIDATE_COLUMNS,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        waiting = cursor.fetchall()
    return placement.find_reservation(rooms, placement.within_lane_room(waiting, lane_rooms))


def _host_for(
    rooms: list[HostRoom] | None, row: tuple[Any, ...], reserved: Reservation | None
) -> HostRoom | None:
    if rooms is None:
        return None
    _job_id, pinned, memory, cpus = row[:4]
    if pinned is not None:
        return next((room for room in rooms if room.host_id == pinned), None)
    exclude = reserved.hosts if reserved is not None else ()
    chosen = placement.choose_host(rooms, Need.of(memory, cpus), exclude=exclude)
    return next((room for room in rooms if room.host_id == chosen), None)


def _run_claim(sql: str, params: list[Any]) -> ContainerJob | None:
    rows = list(ContainerJob.objects.raw(sql, params))
    return rows[0] if rows else None


Target = tuple[str, list[Any]]
_CANDIDATE_COLUMNS = "r.id, r.docker_host_id, r.memory_limit, r.cpu_limit, r.lane"


def _claim(
    worker_id: str,
    max_concurrent: int | None,
    choose: Callable[[_ClaimSQL, datetime, list[HostRoom] | None, Reservation | None], Target],
    honour_reservation: bool = True,
) -> ContainerJob | None:
    """Run one claim: serialize, read the room, select the job ``choose`` picks, then the
    UPDATE that claims it for its host."""
    limit = app_settings.MAX_CONCURRENT_JOBS if max_concurrent is None else max_concurrent
    with transaction.atomic():
        _serialize_claims()
        now = database_now()  # after the wait for the lock, so the lease is not shortened
        lane_rooms = lanes.lane_rooms()
        builder = _ClaimSQL(lanes.blocked(lane_rooms))
        rooms = _rooms()
        reserved = _reservation(builder, now, rooms, lane_rooms) if honour_reservation else None
        sql, params = choose(builder, now, rooms, reserved)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        host = _host_for(rooms, row, reserved)
        if rooms is not None and host is None:
            return None
        sql, params = builder.update(
            job_id=row[0], host=host, worker_id=worker_id, max_concurrent=limit, now=now
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
        builder: _ClaimSQL,
        now: datetime,
        rooms: list[HostRoom] | None,
        reserved: Reservation | None,
    ) -> Target:
        return builder.ready_ids(
            now=now,
            rooms=rooms,
            reserved=reserved,
            exclude_ids=exclude_ids,
            route_of=route,
            columns=_CANDIDATE_COLUMNS,
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
        builder: _ClaimSQL,
        now: datetime,
        rooms: list[HostRoom] | None,
        reserved: Reservation | None,
    ) -> Target:
        return builder.ready_ids(
            now=now, rooms=rooms, only_id=_db_id(job_id), columns=_CANDIDATE_COLUMNS
        )

    # Named explicitly, it is not held back by another job's reservation.
    return _claim(worker_id, max_concurrent, this_job, honour_reservation=False)


def eligible_ready_ids(limit: int) -> list[Any]:
    """Ids of the first ``limit`` ready jobs that claims would take, in claim order.

    Uses the same placement rules as the claim itself, so dispatch never sends a message
    for a job that a claim would refuse (for example one pinned to a full host), and
    counts each admitted job's memory and CPU against the room the next one finds.
    """
    if limit <= 0:
        return []
    lane_rooms = lanes.lane_rooms()
    builder = _ClaimSQL(lanes.blocked(lane_rooms))
    now = database_now()
    rooms = _rooms()
    reserved = _reservation(builder, now, rooms, lane_rooms)
    # Each job is checked alone in SQL; counted together some of them no longer fit (a
    # host or a lane fills up), so read further than the limit to fill it.
    extra = 0 if rooms is None and not lane_rooms else placement.RESERVATION_SCAN
    sql, params = builder.ready_ids(
        now=now,
        rooms=rooms,
        reserved=reserved,
        limit=limit + extra,
        lock=False,
        columns=_CANDIDATE_COLUMNS,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    to_python = ContainerJob._meta.pk.to_python
    # Room left in each limited lane, counted down as its jobs are admitted.
    lane_free = {room.name: room.free for room in lane_rooms if room.free is not None}
    admitted: list[Any] = []
    for row in rows:
        if len(admitted) >= limit:
            break
        lane = row[4]
        if lane_free.get(lane, 1) <= 0:
            continue
        if rooms is None:
            admitted.append(to_python(row[0]))
            if lane in lane_free:
                lane_free[lane] -= 1
            continue
        host = _host_for(rooms, row, reserved)
        if host is None or not host.fits_now(Need.of(row[2], row[3])):
            continue
        admitted.append(to_python(row[0]))
        if lane in lane_free:
            lane_free[lane] -= 1
        rooms = [
            placement.taken(room, Need.of(row[2], row[3])) if room is host else room
            for room in rooms
        ]
    return admitted


def take_over(job_id: Any, worker_id: str) -> ContainerJob | None:
    """Take a launching or running job whose lease expired; keep its attempt number and
    count the rescue (``takeover_count``).

    The new owner then looks for the attempt's container by its deterministic name.
    Expiry is judged by the database's clock, so a worker whose clock runs fast cannot
    take over a lease that is still alive.
    """
    now = database_now()
    updated = ContainerJob.objects.filter(
        pk=job_id, status__in=states.ACTIVE, lease_expires_at__lt=Now()
    ).update(
        claimed_by=worker_id,
        claimed_at=now,
        lease_expires_at=lease_deadline(now),
        # In the same conditional UPDATE: two rescuers racing count one takeover.
        takeover_count=F("takeover_count") + 1,
    )
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
