"""Eager mode: with Celery's ``task_always_eager`` on, a job queued by ``delay()``,
``apply_async()`` or a canvas step runs to its end in the calling process, the way Celery
runs an eager task, and the caller gets a ready result.

The job goes through the real engine (claim, launch, the watcher's look at its container,
finishing, the retry decision) with whatever executor the settings name, usually the
in-memory one in tests (``EXECUTOR: "memory"``). Only the waits are left out, as Celery
leaves them out of eager tasks: ``eta`` and ``countdown`` are ignored and a retry's
back-off is skipped (its ``scheduled_for`` is cleared). A timeout still takes its
``timeout_seconds`` of real time. Like Celery's eager tasks, such a job stores no result
in the backend and sends no task event.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import current_app
from celery.result import EagerResult

from . import following, states
from .conf import app_settings
from .models import ContainerJob
from .queue import JobQueueManager
from .states import Status

# Seconds between looks at a running container: often for the in-memory executor (tests),
# at the usual poll interval for a real daemon.
MEMORY_LOOK_EVERY = 0.01

# Jobs being run eagerly in this process: the result layer leaves their outcome to us.
_here: set[Any] = set()
_here_lock = threading.Lock()


class EagerJobStuck(RuntimeError):
    """An eagerly run job cannot reach a final status from this process."""


def is_eager(app: Any = None) -> bool:
    """Whether Celery runs tasks eagerly (``task_always_eager``) for this app."""
    return bool((app or current_app).conf.task_always_eager)


def propagates(app: Any = None) -> bool:
    """Whether a failed eager run raises at once (``task_eager_propagates``)."""
    return bool((app or current_app).conf.task_eager_propagates)


def running_here(job_id: Any) -> bool:
    with _here_lock:
        return job_id in _here


def run_to_end(job: ContainerJob) -> ContainerJob:
    """Run a queued job in this process until it is final; returns the final row.

    Raises :class:`EagerJobStuck` when the job cannot get there from here: it cannot be
    claimed (no free slot, a container of it still to be stopped), it was dequeued, it is
    held by another process, or it outlived its timeout plus the launch and lease bounds.
    """
    manager = JobQueueManager(worker_id=f"eager:{os.getpid()}")
    memory = (app_settings.EXECUTOR or "docker") == "memory"
    look_every = MEMORY_LOOK_EVERY if memory else max(0.05, float(app_settings.POLL_INTERVAL))
    with _here_lock:
        _here.add(job.pk)
    try:
        return _drive(job, manager, look_every)
    finally:
        with _here_lock:
            _here.discard(job.pk)


def _drive(job: ContainerJob, manager: JobQueueManager, look_every: float) -> ContainerJob:
    bound = float(app_settings.LAUNCH_TIMEOUT) + float(app_settings.LEASE_SECONDS) + 30
    deadline: float | None = None
    while True:
        job.refresh_from_db()
        if job.is_final:
            return job
        if job.status in states.WAITING:
            ContainerJob.objects.filter(pk=job.pk, status__in=states.WAITING).update(
                scheduled_for=None
            )
            claimed, _ = manager.run_job(job.pk, this_job_only=True)
            if claimed is None:
                raise EagerJobStuck(_why_unclaimed(job))
            deadline = time.monotonic() + job.timeout_seconds + bound
            continue
        if job.status not in states.ACTIVE:
            raise EagerJobStuck(f"eager mode: job {job.pk} is {job.status}, not queued")
        if deadline is None:
            if job.claimed_by != manager.worker_id:
                raise EagerJobStuck(f"eager mode: job {job.pk} is held by {job.claimed_by!r}")
            deadline = time.monotonic() + job.timeout_seconds + bound
        if deadline is not None and time.monotonic() > deadline:
            raise EagerJobStuck(
                f"eager mode: job {job.pk} is still {job.status} past its timeout "
                f"(its executor does not answer?)"
            )
        if job.status == Status.RUNNING:
            following.check(job, manager.executor(job))
        time.sleep(look_every)


def _why_unclaimed(job: ContainerJob) -> str:
    job.refresh_from_db()
    from .placement import why_waiting

    reasons = "; ".join(why_waiting(job))
    return f"eager mode: job {job.pk} could not be claimed: {reasons}"


def result_of(job: ContainerJob, propagate: bool = False) -> EagerResult:
    """The ready result of a final job: its result dict, or ``ContainerJobFailed`` (raised
    at once with ``propagate``, as ``task_eager_propagates`` asks)."""
    from .api import job_result
    from .results import failure_of

    if job.status == Status.COMPLETED:
        return EagerResult(job.celery_task_id, job_result(job), "SUCCESS")
    failure = failure_of(job)
    if propagate:
        raise failure
    return EagerResult(job.celery_task_id, failure, "FAILURE")
