"""Celery tasks: thin drivers of the queue engine.

``run_container_job`` takes one job id. It claims the job with one atomic statement (or
takes it over when its previous worker's lease expired), launches or adopts the container,
follows it to the end and returns the job's result. A message it cannot claim for — a
duplicate, a replay, a job that is not its turn — is acknowledged and changes nothing; the
task then raises ``Ignore`` so it never overwrites the result stored by the task that ran
the job (every message for one job carries the job's ``celery_task_id``).

Messages are acknowledged when received (``acks_late=False``): the database, not the broker,
remembers unfinished work, so a broker's visibility timeout can never start a second
container for a job that runs for hours. Lost messages are re-sent by
``dispatch_ready_jobs``; dead workers' jobs are taken over via ``rescue_stale_jobs``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore
from django.utils import timezone

from .api import job_result, send_run_message
from .exceptions import ContainerJobFailed
from .following import Progress
from .models import ContainerJob
from .queue import JobQueueManager, queue_manager
from .states import Status

logger = logging.getLogger(__name__)


@shared_task(
    name="django_container_celery.run_container_job",
    bind=True,
    acks_late=False,
    # A failed job is an expected outcome, not a worker error: logged without a traceback.
    throws=(ContainerJobFailed,),
)
def run_container_job(self: Any, job_id: str) -> dict[str, Any]:
    try:
        uuid.UUID(str(job_id))
    except ValueError:
        logger.error("run_container_job: %r is not a job id; message dropped", job_id)
        raise Ignore() from None
    manager = JobQueueManager()

    def report_running(job: ContainerJob) -> None:
        if self.request.id and not self.request.is_eager:
            self.update_state(
                state="RUNNING",
                meta={
                    "job_id": str(job.pk),
                    "container_id": job.execution_id,
                    "container_name": job.container_name,
                    "attempt": job.attempt,
                },
            )

    job, progress = manager.run_job(job_id, on_running=report_running)
    if job is None:
        # Not ours to run now. If it still waits, let dispatch send it again in its turn.
        manager.forget_dispatch(job_id)
        dispatch_ready_jobs.run()
        raise Ignore()
    dispatch_ready_jobs.run()  # our slot is free (or will be): start the next job now
    job.refresh_from_db()
    if progress is Progress.RUNNING or not job.is_final:
        if job.status == Status.RETRYING and self.request.id and not self.request.is_eager:
            # Not Celery's RETRY: backends decode a RETRY result as an exception.
            self.update_state(
                state="RETRYING", meta={"job_id": str(job.pk), "error": job.last_error}
            )
        raise Ignore()
    if job.status != Status.COMPLETED:
        raise ContainerJobFailed(f"job {job.pk} {job.status}: {job.last_error or 'no detail'}")
    return job_result(job)


@shared_task(name="django_container_celery.dispatch_ready_jobs")
def dispatch_ready_jobs() -> int:
    """Send a run message for each due job that has none in flight, within capacity."""
    sent = 0
    for job in queue_manager.due_for_dispatch():
        if send_run_message(job):
            sent += 1
        else:
            break  # the broker is down: the rest stay queued for the next run
    return sent


@shared_task(name="django_container_celery.rescue_stale_jobs")
def rescue_stale_jobs() -> int:
    """Send a run message for each job whose worker stopped renewing its lease.

    The run task takes the job over, adopts a running container, harvests an exited one
    or retries a vanished one.
    """
    sent = 0
    for job in queue_manager.stale_for_rescue():
        if send_run_message(job):
            sent += 1
    return sent


@shared_task(name="django_container_celery.cleanup_old_jobs")
def cleanup_old_jobs(days: int | None = None) -> dict[str, int]:
    """Delete final jobs older than ``days`` and remove containers of final jobs."""
    return {
        "containers_removed": queue_manager.remove_finished_containers(),
        "jobs_deleted": queue_manager.cleanup_old_jobs(days),
    }


@shared_task(name="django_container_celery.create_container_job")
def create_container_job(template: str | None = None, **definition: Any) -> str:
    """Create a job (from a template job's definition, overridden by ``definition``) and
    queue it. Point a django-celery-beat PeriodicTask at this task for periodic jobs."""
    from .api import create_job_from

    job = create_job_from(template, **definition)
    job.delay()
    return str(job.pk)


def run_job_inline(
    task: Any, container_task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Body of a ``container_task`` signature in a chain or group: create the job once
    (keyed by this task's id, so a retried task finds it), run it here, return its result.

    When the job cannot run now (no capacity, backing off, or run elsewhere by a
    dispatched message) the task retries itself until the job is final.
    """
    from .conf import app_settings

    job = ContainerJob.objects.filter(celery_task_id=task.request.id).first()
    if job is None:
        job = container_task.build_job(args, kwargs)
        queue_manager.queue_job(job)
        # Marked as dispatched: this task runs it; dispatch only steps in if it dies.
        ContainerJob.objects.filter(pk=job.pk).update(
            celery_task_id=task.request.id, dispatched_at=timezone.now()
        )
    manager = JobQueueManager()
    manager.run_job(job.pk, in_turn=False)
    dispatch_ready_jobs.run()
    job.refresh_from_db()
    if job.is_final:
        if job.status != Status.COMPLETED:
            raise ContainerJobFailed(f"job {job.pk} {job.status}: {job.last_error or 'no detail'}")
        return job_result(job)
    wait = float(app_settings.DISPATCH_INTERVAL)
    if job.scheduled_for is not None:
        wait = max(wait, (job.scheduled_for - timezone.now()).total_seconds())
    raise task.retry(countdown=wait, max_retries=None)


__all__ = [
    "ContainerJobFailed",
    "cleanup_old_jobs",
    "create_container_job",
    "dispatch_ready_jobs",
    "rescue_stale_jobs",
    "run_container_job",
]
