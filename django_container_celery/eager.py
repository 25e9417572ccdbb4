"""Eager mode: with Celery's ``task_always_eager`` on, a job queued by ``delay()``,
``apply_async()`` or a canvas step runs to its end in the calling process, the way Celery
runs an eager task, and the caller gets a ready result.

The job goes through the real engine (claim, launch, the watcher's look at its container,
finishing, the retry decision) with whatever executor the settings name, usually the
in-memory one in tests (``EXECUTOR: "memory"``). Only the waits are left out: a retry's
back-off is skipped, as Celery skips an eager retry's countdown. A timeout still takes its
``timeout_seconds`` of real time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import current_app
from celery.result import EagerResult

from . import following, states
from .models import ContainerJob
from .queue import JobQueueManager
from .states import Status

# Seconds between looks at a running container while waiting for it in eager mode.
LOOK_EVERY = 0.01


def is_eager(app: Any = None) -> bool:
    """Whether Celery runs tasks eagerly (``task_always_eager``) for this app."""
    return bool((app or current_app).conf.task_always_eager)


def run_to_end(job: ContainerJob) -> ContainerJob:
    """Run a queued job in this process until it is final; returns the final row.

    Raises ``RuntimeError`` if the job cannot be claimed at all (no free slot anywhere),
    since nothing else would ever run it in eager mode.
    """
    manager = JobQueueManager(worker_id=f"eager:{os.getpid()}")
    while True:
        job.refresh_from_db()
        if job.is_final:
            return job
        if job.status in states.WAITING:
            # The back-off of a retry is skipped, as an eager Celery retry skips its
            # countdown (an explicit eta or countdown never reaches here: see enqueue).
            ContainerJob.objects.filter(pk=job.pk, status__in=states.WAITING).update(
                scheduled_for=None
            )
            claimed, _ = manager.run_job(job.pk, in_turn=False)
            if claimed is None:
                raise RuntimeError(f"eager mode: job {job.pk} could not be claimed (no free slot)")
            continue
        if job.status == Status.RUNNING:
            following.check(job, manager.executor(job))
        time.sleep(LOOK_EVERY)


def result_of(job: ContainerJob) -> EagerResult:
    """The ready result of a final job: its result dict, or ``ContainerJobFailed``."""
    from .api import job_result
    from .results import failure_of

    if job.status == Status.COMPLETED:
        return EagerResult(job.celery_task_id, job_result(job), "SUCCESS")
    failure = failure_of(job)
    return EagerResult(job.celery_task_id, failure, "FAILURE")
