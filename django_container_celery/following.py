"""Where a running job is followed: waited on, kept leased, timed out, or adopted.

Two drivers use this module. The Celery task follows its own job to the end with
:func:`follow` (blocking, renewing the lease as it waits). The queue-mode command polls all
of its jobs with :func:`check` each round. A job taken over after its worker died goes
through :func:`adopt` first, which finds the attempt's container by its deterministic name.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from django.utils import timezone

from . import claims
from .conf import app_settings
from .exceptions import ExecutorError, TransitionConflict
from .executors.base import ContainerState, Executor
from .finishing import finish, remove_container
from .launching import launch_claimed
from .models import ContainerJob
from .states import Status

logger = logging.getLogger(__name__)


class Progress(enum.Enum):
    RUNNING = "running"  # still running, still ours
    FINISHED = "finished"  # final status (or retrying) recorded by us
    LOST = "lost"  # no longer ours: cancelled, taken over, or changed elsewhere


def deadline_of(job: ContainerJob) -> float:
    """Seconds left before the job's timeout (negative when past it)."""
    started = job.started_at or timezone.now()
    end = started + timedelta(seconds=job.timeout_seconds)
    return (end - timezone.now()).total_seconds()


def check(job: ContainerJob, executor: Executor) -> Progress:
    """One look at a running job: finish it if its container exited or it timed out."""
    try:
        state = executor.inspect(job.container_name)
    except ExecutorError:
        logger.warning("job %s: cannot inspect its container now", job.pk, exc_info=True)
        return Progress.RUNNING
    return _act_on(job, executor, state)


def _act_on(job: ContainerJob, executor: Executor, state: ContainerState | None) -> Progress:
    if state is None:
        return _vanished(job)
    if not state.running and state.exit_code is None:
        # Created but never started (its worker died between the two calls): retry.
        remove_container(executor, job.container_name)
        return _vanished(job, state.error or "container was created but never started")
    if not state.running:
        return _finished(finish(job, executor, state.exit_code))
    if deadline_of(job) <= 0:
        return kill_for_timeout(job, executor)
    return Progress.RUNNING


def kill_for_timeout(job: ContainerJob, executor: Executor) -> Progress:
    try:
        executor.stop(job.container_name, timeout=0)
    except ExecutorError:
        logger.warning("job %s: could not kill its container", job.pk, exc_info=True)
    code = _exit_code(executor, job.container_name)
    return _finished(finish(job, executor, code, timed_out=True))


def follow(
    job: ContainerJob,
    executor: Executor,
    should_stop: Callable[[], bool] = lambda: False,
) -> Progress:
    """Wait for the job's container to end, renewing the lease; return how it ended.

    Returns RUNNING only when ``should_stop`` asked us to let go (worker shutdown): the
    claim is left to expire so that a rescue adopts the container later.
    """
    poll = float(app_settings.POLL_INTERVAL)
    renew_every = max(1.0, app_settings.LEASE_SECONDS / 3)
    next_renewal = time.monotonic() + renew_every
    while True:
        remaining = deadline_of(job)
        if remaining <= 0:
            return kill_for_timeout(job, executor)
        try:
            code = executor.wait(job.container_name, timeout=min(poll, remaining))
        except ExecutorError:
            state = _inspect_or_unknown(executor, job.container_name)
            if state is None:
                return _vanished(job)
            code = None
            time.sleep(poll)
        if code is not None:
            return _finished(finish(job, executor, code))
        if time.monotonic() >= next_renewal:
            if not claims.renew_lease(job):
                logger.info("job %s: claim lost while following; letting go", job.pk)
                return Progress.LOST
            next_renewal = time.monotonic() + renew_every
        if should_stop():
            return Progress.RUNNING


def adopt(job: ContainerJob, executor: Executor) -> Progress:
    """Continue a job taken over from a dead worker, by its attempt's container."""
    try:
        state = executor.inspect(job.container_name) if job.attempt else None
    except ExecutorError:
        logger.warning("job %s: cannot inspect; will try again later", job.pk, exc_info=True)
        return Progress.LOST
    if job.status == Status.LAUNCHING:
        if state is None:
            # The dead worker never started this attempt: start the next one ourselves.
            if not job.update_as_claimant(attempt=job.attempt + 1):
                return Progress.LOST
            outcome = launch_claimed(job, executor)
            return Progress.RUNNING if outcome.success else Progress.FINISHED
        try:
            job.mark_as_running(as_claimant=True, execution_id=state.container_id)
        except TransitionConflict:
            return Progress.LOST
    return _act_on(job, executor, state)


def _vanished(
    job: ContainerJob, error: str = "container vanished while the job was running"
) -> Progress:
    try:
        job.mark_as_failed(should_retry=True, error=error, as_claimant=True)
    except TransitionConflict:
        return Progress.LOST
    return Progress.FINISHED


def _finished(recorded: bool) -> Progress:
    return Progress.FINISHED if recorded else Progress.LOST


def _exit_code(executor: Executor, name: str) -> int | None:
    state = _inspect_or_unknown(executor, name)
    return state.exit_code if state is not None else None


def _inspect_or_unknown(executor: Executor, name: str) -> ContainerState | None:
    try:
        return executor.inspect(name)
    except ExecutorError:
        return ContainerState(container_id="", running=True, exit_code=None)
