"""Where one running job is looked at: finished when its container exited, killed past its
timeout, retried when its container vanished, or adopted after its worker died.

The watcher (``watching.py``) calls :func:`check` for every job an event or its reconcile
pass points at; a job taken over after its worker died goes through :func:`adopt` first,
which finds the attempt's container by its deterministic name.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import timedelta

from django.utils import timezone

from .exceptions import ExecutorError, TransitionConflict
from .executors.base import ContainerState, Executor
from .finishing import announce, finish, remove_container
from .launching import launch_claimed
from .models import ContainerJob
from .states import Status

logger = logging.getLogger(__name__)

Remover = Callable[[Executor, str], None]


class Progress(enum.Enum):
    RUNNING = "running"  # still running, still ours
    FINISHED = "finished"  # final status (or retrying) recorded by us
    LOST = "lost"  # no longer ours: cancelled, taken over, or changed elsewhere


def deadline_of(job: ContainerJob) -> float:
    """Seconds left before the job's timeout (negative when past it)."""
    started = job.started_at or timezone.now()
    end = started + timedelta(seconds=job.timeout_seconds)
    return (end - timezone.now()).total_seconds()


def check(job: ContainerJob, executor: Executor, remove: Remover | None = None) -> Progress:
    """One look at a running job: finish it if its container exited or it timed out."""
    try:
        state = executor.inspect(job.container_name)
    except ExecutorError:
        logger.warning("job %s: cannot inspect its container now", job.pk, exc_info=True)
        return Progress.RUNNING
    return _act_on(job, executor, state, remove)


def _act_on(
    job: ContainerJob,
    executor: Executor,
    state: ContainerState | None,
    remove: Remover | None = None,
) -> Progress:
    if state is None:
        return _vanished(job)
    if not state.running and state.exit_code is None:
        # Created but never started (its worker died between the two calls): retry.
        remove_container(executor, job.container_name)
        return _vanished(job, state.error or "container was created but never started")
    if not state.running:
        return _finished(finish(job, executor, state.exit_code, remove=remove))
    if deadline_of(job) <= 0:
        return kill_for_timeout(job, executor, remove)
    return Progress.RUNNING


def kill_for_timeout(
    job: ContainerJob, executor: Executor, remove: Remover | None = None
) -> Progress:
    try:
        executor.stop(job.container_name, timeout=0)
    except ExecutorError:
        logger.warning("job %s: could not kill its container", job.pk, exc_info=True)
    code = _exit_code(executor, job.container_name)
    return _finished(finish(job, executor, code, timed_out=True, remove=remove))


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
    announce(job)
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
