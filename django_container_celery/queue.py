"""JobQueueManager: the queue's public operations, built on claims, launching, following
and finishing. It imports nothing from Celery; the Celery tasks and the queue-mode command
are two thin drivers of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Min, Q, QuerySet
from django.utils import timezone

from . import claims, dispatch, following, placement, states, watching
from .conf import app_settings
from .exceptions import ExecutorError, InvalidTransition
from .executors import executor_for
from .executors.base import ContainerInfo, Executor
from .finishing import end_attempt, remove_container
from .installation import installation_id
from .launching import LaunchOutcome, launch_claimed
from .masking import mask_text, masked_exception
from .models import ContainerJob, ExecutorHost
from .outcomes import End, Ending
from .states import Status

logger = logging.getLogger(__name__)

ExecutorFactory = Callable[[ExecutorHost | None], Executor]


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobQueueManager:
    """Queue, claim, launch, harvest and inspect container jobs.

    ``executor_factory`` maps a job's host to an executor (tests pass an in-memory one);
    ``worker_id`` names the owner recorded in claims (default: host name and process id,
    read at each call so a forked worker gets its own).
    """

    def __init__(
        self,
        executor_factory: ExecutorFactory | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.executor_factory: ExecutorFactory = executor_factory or executor_for
        self._worker_id = worker_id

    @property
    def worker_id(self) -> str:
        return self._worker_id or default_worker_id()

    def executor(self, job: ContainerJob) -> Executor:
        return self.executor_factory(job.assigned_host or job.docker_host)

    # -- queueing ---------------------------------------------------------------------

    def queue_job(
        self,
        job: ContainerJob,
        schedule_for: datetime | None = None,
        priority: int | None = None,
        celery_task_id: str | None = None,
    ) -> ContainerJob:
        """Put a pending (or failed) job in the queue, optionally for later (and record the
        task id its messages will carry)."""
        if job.status in (Status.QUEUED, Status.RETRYING):
            raise ValueError(f"Job {job.pk} is already queued")
        if job.status in states.TERMINAL:
            raise ValueError(f"Job {job.pk} is {job.status} and cannot be queued")
        if job.status != Status.PENDING and not job.can_transition_to(Status.QUEUED):
            raise ValueError(f"Job {job.pk} is {job.status} and cannot be queued now")
        fields: dict[str, Any] = {"dispatched_at": None}
        if job.status == Status.FAILED:
            # Queued again by a person or their code: a decision taken after looking (see
            # retry_failed_job), so the attempts without an outcome are counted afresh.
            fields.update(needs_attention=False, attempts_without_outcome=0)
        if priority is not None:
            from django.core.exceptions import ValidationError

            from .validators import validate_priority

            try:
                validate_priority(priority)
            except ValidationError as error:
                raise ValidationError({"priority": error.error_list}) from None
            fields["priority"] = priority
        if celery_task_id is not None:
            fields["celery_task_id"] = celery_task_id
        job.mark_as_queued(scheduled_for=schedule_for, **fields)
        return job

    def dequeue_job(self, job: ContainerJob) -> ContainerJob:
        """Take a waiting job out of the queue, back to pending."""
        if job.status not in states.WAITING:
            raise ValueError(f"Job {job.pk} is {job.status}, not waiting in the queue")
        job.transition_to(Status.PENDING, queued_at=None, scheduled_for=None, dispatched_at=None)
        return job

    def cancel_job(self, job: ContainerJob) -> bool:
        """Cancel a job that is not final; stop and remove its container if it has one.

        A container that cannot be stopped now (its host does not answer) is marked
        ``stop_pending``: it keeps its host slot, and the reconcile pass stops it as soon
        as the host answers.
        """
        for _ in range(5):  # the job may move under us (claimed, started): try again
            if job.status not in states.CANCELLABLE:
                return False
            had_container = job.status in states.ACTIVE and job.attempt > 0
            # The slot stays taken (stop_pending) until the container is seen stopped.
            held: dict[str, Any] = {"stop_pending": True} if had_container else {}
            if not end_attempt(job, Ending(End.CANCELLED), as_claimant=False, **held):
                job.refresh_from_db()
                continue
            if had_container:
                self._stop_cancelled(job)
            return True
        return False

    def _stop_cancelled(self, job: ContainerJob) -> None:
        executor = self.executor(job)
        try:
            executor.stop(job.container_name, timeout=5)
        except ExecutorError:
            logger.warning(
                "job %s: could not stop its container; it keeps its slot until the "
                "reconcile pass stops it",
                job.pk,
                exc_info=True,
            )
            return
        ContainerJob.objects.filter(pk=job.pk, attempt=job.attempt).update(stop_pending=False)
        job.stop_pending = False
        if not app_settings.KEEP_CONTAINERS:
            remove_container(executor, job.container_name)

    def get_ready_jobs(
        self, limit: int | None = None, exclude_ids: Sequence[Any] | None = None
    ) -> QuerySet[ContainerJob]:
        qs = ContainerJob.objects.ready()
        if exclude_ids:
            qs = qs.exclude(pk__in=exclude_ids)
        return qs[:limit] if limit is not None else qs

    # -- claiming and launching -----------------------------------------------------------

    def acquire_next_job(
        self, worker_id: str | None = None, max_concurrent: int | None = None
    ) -> ContainerJob | None:
        """Claim the next ready job for this worker (priority, then FIFO), or None."""
        return claims.claim_next(worker_id or self.worker_id, max_concurrent)

    def launch_job(self, job: ContainerJob) -> dict[str, Any]:
        """Claim the job if needed, start its container, return once it runs."""
        outcome = self._launch(job)
        return {"success": outcome.success, "error": outcome.error}

    def launch_job_with_retry(self, job: ContainerJob) -> dict[str, Any]:
        """Like launch_job, plus whether (and when) a retry was scheduled."""
        return self._launch(job).as_dict()

    def _launch(self, job: ContainerJob) -> LaunchOutcome:
        if job.status != Status.LAUNCHING or job.claimed_by != self.worker_id:
            claimed = claims.claim_job(job.pk, self.worker_id)
            if claimed is None:
                job.refresh_from_db()
                return LaunchOutcome(
                    False, f"job {job.pk} could not be claimed (status {job.status})"
                )
            _copy_into(job, claimed)
        return launch_claimed(job, self.executor(job))

    def launch_next_batch(self, max_concurrent: int = 5, timeout: float = 30) -> dict[str, Any]:
        """Claim and launch ready jobs until ``max_concurrent`` jobs run (globally).

        One failed launch never stops the batch; its error is reported and the loop goes on.
        Waiting jobs that no host can ever hold are failed first, as dispatch does.
        """
        import time

        launched = 0
        errors: list[str] = []
        tried: list[Any] = []
        started: list[Any] = []
        deadline = time.monotonic() + timeout
        dispatch.refuse_unfittable()
        while time.monotonic() < deadline:
            job = claims.claim_next(self.worker_id, max_concurrent, exclude_ids=tried)
            if job is None:
                break
            tried.append(job.pk)
            try:
                outcome = launch_claimed(job, self.executor(job))
            except Exception as exc:  # keep the batch going whatever one job does
                logger.error(
                    "job %s: launch crashed",
                    job.pk,
                    exc_info=masked_exception(exc, job.environment),
                )
                error = mask_text(f"{type(exc).__name__}: {exc}", job.environment)
                outcome = LaunchOutcome(False, error)
            if outcome.success:
                launched += 1
                started.append(job.pk)
            else:
                errors.append(f"{job.pk}: {outcome.error}")
        return {"launched": launched, "errors": errors, "job_ids": started}

    # -- watching -------------------------------------------------------------------------

    def harvest_finished_jobs(self, worker_id: str | None = None) -> int:
        """The reconcile pass, once, over every host: finish running jobs whose containers
        exited, kill those past their timeout, retry vanished ones, take over jobs whose
        lease expired. With ``worker_id``, only running jobs that worker holds."""
        done = watching.reconcile_all(self.worker_id, self.executor_factory, owner=worker_id)
        return done.finished

    def run_job(
        self,
        job_id: Any,
        *,
        this_job_only: bool = False,
        on_started: Callable[[ContainerJob, str], None] | None = None,
    ) -> tuple[ContainerJob | None, following.Progress | None]:
        """Serve one run message for ``job_id``: claim and launch, or take over; return at
        once.

        The message is a right to start one job on its route, so the claim takes the best
        ready job that fits a free slot among those sharing ``job_id``'s queue (priority,
        then FIFO): the returned job may be another one. ``this_job_only`` claims exactly
        ``job_id`` (eager mode). When nothing can be claimed, ``job_id`` itself is taken
        over if its lease expired.

        A message that does not start ``job_id`` itself is used up: ``job_id`` may then get
        a new one from dispatch (cleared before the launch, which may take long).

        The run is detached: once the container runs, the watcher that leads its host
        finishes the job. Returns (None, None) when there is nothing to do: no ready job
        fits a free slot, and ``job_id`` is not a stale one. A duplicate or replayed
        message therefore starts at most a job that was due to start anyway, within every
        limit, and never a second container for one attempt.
        """
        if this_job_only:
            job = claims.claim_job(job_id, self.worker_id)
        else:
            job = claims.claim_next(self.worker_id, route_of=job_id)
            if job is None or job.pk != _as_uuid(job_id):
                dispatch.forget(job_id)
        if job is not None:
            outcome = launch_claimed(job, self.executor(job), on_started=on_started)
            if outcome.success:
                return job, following.Progress.RUNNING
            return job, following.Progress.FINISHED
        job = claims.take_over(job_id, self.worker_id)
        if job is None:
            return None, None
        return job, following.adopt(job, self.executor(job))

    def rescue_stale_jobs(self, limit: int = 100) -> int:
        """Reconcile every host that no watcher leads; returns how many jobs were taken over.

        A job whose lease expired is taken over: a running container is adopted, an exited
        one harvested, a vanished one retried, a launch that never started launched again.
        Hosts with a live watcher are left to it.
        """
        done = watching.reconcile_all(self.worker_id, self.executor_factory, only_unwatched=True)
        return done.rescued

    # -- metrics and failures -------------------------------------------------------------

    def get_worker_metrics(self) -> dict[str, int]:
        stats = self.get_queue_stats()
        return {key: stats[key] for key in _METRIC_KEYS}

    def get_queue_stats(self, rooms: Sequence[placement.HostRoom] | None = None) -> dict[str, Any]:
        """Metrics, counts by status, the oldest waiting job's queue time and each host's
        room (``rooms``: the hosts' room when the caller has read it already).

        Three small queries rather than one pass over the table, each answered from an
        index alone at any size of the table: the counts by status from the
        (status, completed_at) index, the waiting jobs' figures from the partial index on
        their queued_at and scheduled_for, launch failures from their own partial index.
        The waiting figures agree with each other (one statement); the counts by status,
        read a moment apart, may differ from them by a job that moved in between.
        """
        now = timezone.now()
        jobs = ContainerJob.objects.order_by()
        by_status = {s.value: 0 for s in Status}
        # COUNT(*), naming no column: an index-only scan can answer it.
        for status, count in jobs.values_list("status").annotate(n=Count("*")):
            if status in by_status:
                by_status[status] = count
        waiting = jobs.filter(status__in=sorted(states.WAITING)).aggregate(
            waiting=Count("*"),
            scheduled_future=Count("scheduled_for", filter=Q(scheduled_for__gt=now)),
            oldest_waiting_since=Min("queued_at"),
        )
        launch_failed = jobs.filter(status=Status.FAILED, launched_at__isnull=True).count()
        scheduled_future = int(waiting["scheduled_future"])
        # Waiting and not scheduled later means due now: scheduled_for empty or past.
        ready_now = int(waiting["waiting"]) - scheduled_future
        stats: dict[str, Any] = {
            "queue_depth": ready_now + scheduled_future,
            "ready_now": ready_now,
            "scheduled_future": scheduled_future,
            "running": sum(by_status[s] for s in states.ACTIVE),
            "launch_failed": launch_failed,
            "by_status": by_status,
            "oldest_waiting_since": waiting["oldest_waiting_since"],
        }
        if rooms is None:
            rooms = placement.host_rooms()
        stats["hosts"] = [_host_stats(room) for room in rooms]
        return stats

    def get_failed_jobs(self, include_retrying: bool = False) -> QuerySet[ContainerJob]:
        wanted = [Status.FAILED, Status.RETRYING] if include_retrying else [Status.FAILED]
        return ContainerJob.objects.filter(status__in=wanted).order_by("-last_error_at")

    def retry_failed_job(self, job: ContainerJob, reset_count: bool = False) -> ContainerJob:
        """Queue a failed job again now, optionally with a fresh retry budget.

        An operator's retry is a decision taken after looking: a job that needed attention
        no longer does, and its count of attempts without an outcome starts again.
        """
        if job.status != Status.FAILED:
            raise InvalidTransition(job.status, Status.QUEUED, job.pk, "only failed jobs retry")
        fields: dict[str, Any] = {
            "dispatched_at": None,
            "completed_at": None,
            "needs_attention": False,
            "attempts_without_outcome": 0,
        }
        if reset_count:
            fields["retry_count"] = 0
        job.mark_as_queued(scheduled_for=None, **fields)
        return job

    def due_for_dispatch(self, max_concurrent: int | None = None) -> list[ContainerJob]:
        """Ready jobs to send run messages for now, marked as sent (see ``dispatch``)."""
        return dispatch.due_jobs(max_concurrent)

    def forget_dispatch(self, job_id: Any) -> None:
        """A message for this job was used without claiming it: allow a new one."""
        dispatch.forget(job_id)

    def leftover_containers(self, include_unlabelled: bool = False) -> list[Leftover]:
        """The containers cleanup removes, each with the reason: those of this installation
        (on the default host and every active host) that are not the current attempt of an
        active job. ``include_unlabelled`` adds containers that have no installation label
        (started before containers carried one)."""
        leftovers: list[Leftover] = []
        seen: set[str] = set()  # the default host may also be listed as a host row
        hosts: list[ExecutorHost | None] = [None, *ExecutorHost.objects.filter(is_active=True)]
        for host in hosts:
            executor = self.executor_factory(host)
            try:
                found = _own_containers(executor, include_unlabelled)
            except ExecutorError:
                logger.warning("cannot list containers on %s", host or "default host")
                continue
            found = [info for info in found if info.container_id not in seen]
            seen.update(info.container_id for info in found)
            jobs = _jobs_of(found)
            for info in found:
                reason = _why_leftover(info, _job_of(info, jobs))
                if reason is not None:
                    leftovers.append(Leftover(executor, host, info, reason))
        return leftovers

    def remove_leftovers(self, leftovers: Sequence[Leftover]) -> list[Leftover]:
        """Remove the given containers; return those removed (a failure is logged, and the
        next cleanup tries again)."""
        removed = []
        for leftover in leftovers:
            try:
                leftover.executor.remove(leftover.info.name)
            except ExecutorError:
                logger.warning("could not remove container %s", leftover.info.name, exc_info=True)
                continue
            removed.append(leftover)
        return removed

    def remove_finished_containers(self, include_unlabelled: bool = False) -> int:
        """Remove :meth:`leftover_containers`; return how many were removed."""
        return len(self.remove_leftovers(self.leftover_containers(include_unlabelled)))

    def old_jobs(self, days: int | None = None) -> QuerySet[ContainerJob]:
        """Final jobs finished more than ``days`` ago (default from settings)."""
        age = app_settings.CLEANUP_AFTER_DAYS if days is None else days
        cutoff = timezone.now() - timedelta(days=age)
        return ContainerJob.objects.filter(status__in=states.FINAL, completed_at__lt=cutoff)

    def cleanup_old_jobs(self, days: int | None = None) -> int:
        """Delete :meth:`old_jobs`; return how many jobs were deleted (their attempt rows
        go with them and are not counted)."""
        # Only the keys are loaded to cascade to the attempt rows: the jobs' logs would
        # otherwise be read into memory, a whole backlog of them at once.
        _total, by_model = self.old_jobs(days).only("pk").delete()
        return by_model.get(ContainerJob._meta.label, 0)


_METRIC_KEYS = ("queue_depth", "ready_now", "scheduled_future", "running", "launch_failed")


JobRow = tuple[str, int]  # a job's (status, attempt)


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A container that cleanup removes, the daemon it is on, and why it goes."""

    executor: Executor
    host: ExecutorHost | None
    info: ContainerInfo
    reason: str


def _own_containers(executor: Executor, include_unlabelled: bool) -> list[ContainerInfo]:
    own = installation_id()
    if not include_unlabelled:
        return executor.list_job_containers(installation=own)
    # Containers from before the label existed cannot be told apart from another
    # installation's, so they are taken only when asked for.
    return [info for info in executor.list_job_containers() if info.installation in (own, "")]


def _jobs_of(found: list[ContainerInfo]) -> dict[uuid.UUID, JobRow]:
    """(status, attempt) of each listed container's job that this database knows."""
    ids = {pk for pk in map(_uuid_or_none, (info.job_id for info in found)) if pk is not None}
    rows = ContainerJob.objects.filter(pk__in=ids).values_list("pk", "status", "attempt")
    return {_as_uuid(pk): (str(status), int(attempt)) for pk, status, attempt in rows}


def _job_of(info: ContainerInfo, jobs: dict[uuid.UUID, JobRow]) -> JobRow | None:
    pk = _uuid_or_none(info.job_id)
    return None if pk is None else jobs.get(pk)


def _why_leftover(info: ContainerInfo, job: JobRow | None) -> str | None:
    """Why cleanup removes this container, or None when it stays."""
    if job is None:
        # The row is gone (deleted with old jobs) or was never here. A running container
        # stays all the same: it may have been started from a copy of this database.
        return None if info.running else "its job is not in this database"
    status, attempt = job
    if info.attempt != attempt:
        return f"attempt {info.attempt} is not the job's current attempt ({attempt})"
    if status in states.ACTIVE:
        return None  # the live attempt
    return f"its job is {status}"


def _as_uuid(value: Any) -> uuid.UUID:
    """A job id as a UUID, whether the database driver gave a UUID or its hex text."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _host_stats(room: placement.HostRoom) -> dict[str, Any]:
    """One host's slots, memory and CPU, used versus capacity (None: not counted)."""
    return {
        "name": room.name,
        "active": room.active,
        "slots": room.slots,
        "used_slots": room.used_slots,
        "memory_mb": room.memory_mb,
        "used_memory_mb": room.used_memory_mb,
        "cpus": room.cpus,
        "used_cpus": room.used_cpus,
    }


def _copy_into(target: ContainerJob, source: ContainerJob) -> None:
    for field in ContainerJob._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))


queue_manager = JobQueueManager()
