"""Celery tasks: thin drivers of the queue engine.

``run_container_job`` takes one job id. Its message is a right to start one job on its
route: it claims, with one atomic statement, the best ready job that fits a free slot
among those routed like that job (usually the job itself; a better one if one waits, see
``claims.py``), or takes the job over when its previous worker's lease expired, launches
or adopts the container and returns: the worker slot is busy for the seconds a launch
takes, not for the container's runtime. The watcher that leads the job's host
(``watching.py``) finishes the job, and ``results.py`` stores its result under the job's
own ``celery_task_id``, whichever message started it. A message that cannot claim — a
duplicate, a replay, no free slot — is acknowledged and changes nothing. The task itself
always ends with ``Ignore``, so it never stores a result that could overwrite a job's.

Messages are acknowledged when received (``acks_late=False``): the database, not the broker,
remembers unfinished work, so a broker's visibility timeout can never start a second
container. Lost messages are re-sent by ``dispatch_ready_jobs``; what dead workers left is
reconciled by the watchers, or by ``rescue_stale_jobs`` where no watcher leads.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore
from django.db import transaction
from django.utils import timezone

from . import following
from .api import job_result, send_run_message
from .conf import app_settings
from .exceptions import ContainerJobFailed
from .following import Progress
from .models import ContainerJob, database_now
from .queue import JobQueueManager, queue_manager
from .results import failure_of
from .states import Status

logger = logging.getLogger(__name__)


@shared_task(
    name="django_container_celery.run_container_job",
    bind=True,
    acks_late=False,
    # A job's own message may be consumed after another message started or even ended
    # the job: a STARTED state stored then would overwrite the job's result.
    track_started=False,
)
def run_container_job(self: Any, job_id: str) -> None:
    try:
        uuid.UUID(str(job_id))
    except ValueError:
        logger.error("run_container_job: %r is not a job id; message dropped", job_id)
        raise Ignore() from None
    manager = JobQueueManager()
    job, progress = manager.run_job(job_id, on_started=_running_reporter(self, job_id))
    if job is None:
        # Nothing to start now; the job's message is forgotten, so dispatch sends it a
        # new one in its turn (now, if a slot freed meanwhile).
        dispatch_ready_jobs.run()
        raise Ignore()
    if progress is not Progress.RUNNING:
        dispatch_ready_jobs.run()  # the launch ended the attempt: its slot is free
    raise Ignore()


def _running_reporter(task: Any, message_job_id: Any) -> Callable[[ContainerJob, str], None]:
    """The ``on_started`` callback of a launch by ``task``: the started job's RUNNING state
    under its own task id, and a task-started event when its own message is not the one
    being run (the message may have started a better job than it was sent for)."""

    def report_running(job: ContainerJob, container_id: str) -> None:
        # Runs before the row says running, so before anything can store the final result.
        if not job.celery_task_id or task.request.is_eager:
            return
        task.update_state(
            state="RUNNING",
            task_id=job.celery_task_id,
            meta={
                "job_id": str(job.pk),
                "container_id": container_id,
                "container_name": job.container_name,
                "attempt": job.attempt,
            },
        )
        if job.pk != uuid.UUID(str(message_job_id)) or job.celery_task_id != task.request.id:
            _announce_started(task, job)

    return report_running


def _announce_started(task: Any, job: ContainerJob) -> None:
    """Tell Flower a job started whose own message has not been consumed yet."""
    if not app_settings.SEND_TASK_EVENTS:
        return
    try:
        with task.app.events.default_dispatcher(hostname=task.request.hostname) as events:
            events.send("task-started", uuid=job.celery_task_id)
    except Exception as exc:  # events are best effort: the broker may be down
        logger.info("job %s: could not send task-started (%s)", job.pk, exc)


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
    """Run the reconcile pass on every host that no watcher leads; returns how many jobs
    were taken over. With watchers running this finds nothing to do."""
    return queue_manager.rescue_stale_jobs()


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
    queue it. Point a django-celery-beat PeriodicTask at this task for periodic jobs.

    A missing template or host, or an invalid definition, raises ``ValidationError``
    naming the field; the job is saved and queued in one transaction, or not at all."""
    from .api import job_from

    job = job_from(template, **definition)
    job.delay()
    return str(job.pk)


def run_job_inline(
    task: Any, container_task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Body of a ``container_task`` signature in a chain, group or chord: create the job
    once (keyed by this task's id, so a retried task finds it), launch it, wait here until
    it is final and return its result to the canvas.

    A step therefore holds one worker slot for its container's runtime (the price of
    passing results on inside Celery's canvas). While it waits it also looks at its own
    container every ``POLL_INTERVAL`` seconds, so it ends even where no watcher runs; the
    watcher, when there is one, usually records the exit first. Like a run message, the
    step's claim starts the best ready job on its route, which may be another one; when
    its own job cannot start now (no capacity, backing off, a better job took the slot)
    the task retries itself until the job is final.
    """
    job = ContainerJob.objects.filter(celery_task_id=task.request.id).first()
    if job is None:
        from django.core.exceptions import ValidationError

        from .exceptions import InvalidJobDefinition

        try:
            # One transaction: a step that dies here leaves no pending row behind.
            with transaction.atomic():
                job = container_task.build_job(args, kwargs)
                queue_manager.queue_job(job)
                # Marked as dispatched: this task runs it; dispatch steps in if it dies.
                ContainerJob.objects.filter(pk=job.pk).update(
                    celery_task_id=task.request.id, dispatched_at=database_now()
                )
        except ValidationError as error:
            # Django's error does not survive a JSON result backend readably; this flat
            # one does, and the task lists it in ``throws``: no traceback in the log.
            raise InvalidJobDefinition.from_validation_error(error) from None
    if task.request.is_eager:
        from .eager import run_to_end

        job = run_to_end(job)
        if job.status != Status.COMPLETED:
            raise failure_of(job)
        return job_result(job)
    manager = JobQueueManager()
    manager.run_job(job.pk, on_started=_running_reporter(task, job.pk))
    job.refresh_from_db()
    poll = max(0.05, float(app_settings.POLL_INTERVAL))
    while job.status in (Status.LAUNCHING, Status.RUNNING):
        time.sleep(poll)
        job.refresh_from_db()
        if job.status == Status.RUNNING:
            following.check(job, manager.executor(job))
            job.refresh_from_db()
    if job.is_final:
        if job.status != Status.COMPLETED:
            raise failure_of(job)
        return job_result(job)
    dispatch_ready_jobs.run()
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
