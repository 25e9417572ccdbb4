"""Where one running job is looked at: finished when its container exited (or was killed for
memory), killed past its timeout, retried when its container vanished, or adopted after its
worker died.

The watcher (``watching.py``) calls :func:`check` for every job an event or its reconcile
pass points at; a job taken over after its worker died goes through :func:`adopt` first,
which finds the attempt's container by its deterministic name.

Docker side effects are fenced like database writes: before stopping or removing a
container, the claim is confirmed (and its lease renewed) by a conditional UPDATE, so a
process whose claim moved on never touches a container someone else now owns.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from .claims import renew_lease
from .exceptions import ExecutorError, TransitionConflict
from .executors.base import ContainerState, Executor
from .finishing import end_attempt, finish, remove_container
from .launching import launch_claimed
from .models import ContainerJob, database_now
from .outcomes import End, Ending
from .states import Status

logger = logging.getLogger(__name__)

Remover = Callable[[Executor, str], None]


class Progress(enum.Enum):
    RUNNING = "running"  # still running, still ours
    FINISHED = "finished"  # final status (or retrying) recorded by us
    LOST = "lost"  # no longer ours: cancelled, taken over, or changed elsewhere


def deadline_of(job: ContainerJob, now: datetime | None = None) -> float:
    """Seconds left before the job's timeout (negative when past it), by the database's
    clock: ``started_at`` is written with it too."""
    now = now or database_now()
    started = job.started_at or now
    end = started + timedelta(seconds=job.timeout_seconds)
    return (end - now).total_seconds()


def check(
    job: ContainerJob,
    executor: Executor,
    remove: Remover | None = None,
    now: datetime | None = None,
    oom_seen: bool = False,
) -> Progress:
    """One look at a running job: finish it if its container exited or it timed out.

    ``oom_seen``: the caller saw an ``oom`` event for the container, so an exit counts as
    a kill for memory even when its state does not say so (``State.OOMKilled`` is missed
    under cgroup v2 by some daemon versions).
    """
    try:
        state = executor.inspect(job.container_name)
    except ExecutorError:
        logger.warning("job %s: cannot inspect its container now", job.pk, exc_info=True)
        return Progress.RUNNING
    return _act_on(job, executor, state, remove, now, oom_seen)


def _act_on(
    job: ContainerJob,
    executor: Executor,
    state: ContainerState | None,
    remove: Remover | None = None,
    now: datetime | None = None,
    oom_seen: bool = False,
) -> Progress:
    if state is None:
        return _vanished(job)
    if not state.running and state.exit_code is None:
        # Created but never started, yet the row says running: retry the job.
        if not renew_lease(job):
            return Progress.LOST
        remove_container(executor, job.container_name)
        return _vanished(job, state.error or "container was created but never started")
    if not state.running:
        oom = state.oom_killed or oom_seen
        return _finished(finish(job, executor, state.exit_code, out_of_memory=oom, remove=remove))
    if deadline_of(job, now) <= 0:
        return kill_for_timeout(job, executor, remove)
    return Progress.RUNNING


def kill_for_timeout(
    job: ContainerJob, executor: Executor, remove: Remover | None = None
) -> Progress:
    """Kill a job past its timeout. Until the kill succeeds the job stays running (and
    keeps its slot): the next pass tries again, so a slot is never freed while its
    container may still run."""
    if not renew_lease(job):
        return Progress.LOST
    try:
        executor.stop(job.container_name, timeout=0)
    except ExecutorError:
        logger.warning("job %s: could not kill its container; will try again", job.pk)
        return Progress.RUNNING
    state = _inspect_or_unknown(executor, job.container_name)
    if state is not None and state.running:
        return Progress.RUNNING
    code = state.exit_code if state is not None else None
    return _finished(finish(job, executor, code, timed_out=True, remove=remove))


def adopt(job: ContainerJob, executor: Executor) -> Progress:
    """Continue a job taken over from a dead (or too slow) owner, by its attempt's
    container.

    A launch taken over keeps its attempt number and so its container name: if the first
    launcher is still creating that container, the daemon refuses one of the two, and a
    container created but never started is replaced (see ``DockerExecutor.start``), so
    the attempt never runs twice.
    """
    try:
        state = executor.inspect(job.container_name) if job.attempt else None
    except ExecutorError:
        logger.warning("job %s: cannot inspect; will try again later", job.pk, exc_info=True)
        return Progress.LOST
    if job.status == Status.LAUNCHING:
        if state is None or (not state.running and state.exit_code is None):
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
    return _finished(end_attempt(job, Ending(End.VANISHED, error=error)))


def _finished(recorded: bool) -> Progress:
    return Progress.FINISHED if recorded else Progress.LOST


def _inspect_or_unknown(executor: Executor, name: str) -> ContainerState | None:
    try:
        return executor.inspect(name)
    except ExecutorError:
        return ContainerState(container_id="", running=True, exit_code=None)
