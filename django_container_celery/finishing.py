"""Where a job is finished: exit code and logs stored, final status decided.

The database row is written first and the container removed second: a worker that dies
in between leaves an exited container (found later by cleanup), never a job that a rescue
would run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .conf import app_settings
from .exceptions import ExecutorError, TransitionConflict
from .executors.base import Executor
from .models import ContainerJob
from .retry import is_retryable_exit_code
from .signals import attempt_ended

logger = logging.getLogger(__name__)


def finish(
    job: ContainerJob,
    executor: Executor,
    exit_code: int | None,
    *,
    error: str = "",
    timed_out: bool = False,
    remove: Callable[[Executor, str], None] | None = None,
) -> bool:
    """Record the end of the job's current attempt; False if our claim was lost.

    Exit 0 completes the job. A timeout fails it for good. An exit code listed in
    ``retry_exit_codes`` retries it within ``max_retries``. Anything else fails it.
    ``remove`` replaces the inline container removal (the watcher defers it, so that the
    next job's exit is not recorded late behind a slow removal).
    """
    stdout, stderr = _read_logs(executor, job.container_name)
    fields: dict[str, Any] = {"exit_code": exit_code, "stdout_log": stdout, "stderr_log": stderr}
    try:
        if timed_out:
            job.mark_as_failed(
                should_retry=False,
                error=error or f"timed out after {job.timeout_seconds} seconds; container killed",
                as_claimant=True,
                **fields,
            )
        elif exit_code == 0 and not error:
            job.mark_as_completed(as_claimant=True, **fields)
        else:
            retryable = is_retryable_exit_code(exit_code, job.retry_exit_codes or [])
            message = error or f"container exited with code {exit_code}"
            if retryable:
                message += " (listed in retry_exit_codes)"
            job.mark_as_failed(should_retry=retryable, error=message, as_claimant=True, **fields)
    except TransitionConflict:
        logger.info("job %s: not finished here, its claim moved on", job.pk)
        return False
    announce(job)
    if not app_settings.KEEP_CONTAINERS:
        (remove or remove_container)(executor, job.container_name)
    return True


def announce(job: ContainerJob) -> None:
    """Tell listeners (the Celery result layer) how the job's attempt ended.

    A listener's failure is logged and never undoes or blocks the write already made.
    """
    for receiver, outcome in attempt_ended.send_robust(sender=ContainerJob, job=job):
        if isinstance(outcome, Exception):
            logger.warning(
                "job %s: %r failed on attempt_ended: %s",
                job.pk,
                receiver,
                outcome,
                exc_info=outcome,
            )


def remove_container(executor: Executor, name: str) -> None:
    try:
        executor.remove(name)
    except ExecutorError:
        logger.warning("could not remove container %s; cleanup will retry", name, exc_info=True)


def _read_logs(executor: Executor, name: str) -> tuple[str, str]:
    try:
        return executor.logs(name, app_settings.LOG_MAX_BYTES)
    except ExecutorError as exc:
        return "", f"[logs unavailable: {exc}]"
