"""The Celery result of every job, whoever ended it.

A job's attempt may end in a Celery worker's watcher thread, in ``process_container_jobs``,
in an operator's cancel or in a failed launch. Each of them sends the engine's
``attempt_ended`` signal; this module listens and stores the outcome under the job's
``celery_task_id`` in the result backend (SUCCESS with the result dict, FAILURE with
:class:`ContainerJobFailed`, RETRYING while a retry waits), then sends the matching task
event (``task-succeeded``, ``task-failed``, ``task-retried``) so that Flower is right too.

Both leave the app, so the job's secret environment values are masked in everything they
carry: the result dict, the error text and the exception.

Nothing here may break finishing: every failure is logged and swallowed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import current_app, states
from celery.backends.base import DisabledBackend
from celery.utils.saferepr import saferepr
from django.dispatch import receiver

from .api import job_result
from .conf import app_settings
from .eager import running_here
from .exceptions import ContainerJobFailed
from .masking import mask_text
from .models import ContainerJob
from .signals import attempt_ended
from .states import Status

logger = logging.getLogger(__name__)

# The event sender's name: a worker's node name when its watcher finishes jobs (set by
# worker.py), so Flower files the outcome under that worker; else Celery's default.
event_hostname: str | None = None

_lock = threading.Lock()
_dispatcher: Any = None
_dispatcher_pid: int | None = None


def failure_of(job: ContainerJob) -> ContainerJobFailed:
    """The exception a failed or cancelled job's result raises, its secrets masked."""
    message = f"job {job.pk} {job.status}: {job.last_error or 'no detail'}"
    return ContainerJobFailed(mask_text(message, job.environment))


@receiver(attempt_ended, dispatch_uid="django_container_celery.results.publish")
def publish(sender: Any, job: ContainerJob, **kwargs: Any) -> None:
    """Store the job's outcome under its task id and announce it with a task event."""
    task_id = job.celery_task_id
    app = current_app
    if not task_id or running_here(job.pk):
        # Run eagerly in this process: the caller gets a ready result; like Celery's own
        # eager tasks it stores nothing and sends no event (tests often have no broker).
        return
    backend = app.backend
    stored = not isinstance(backend, DisabledBackend)
    if job.status == Status.COMPLETED:
        value = job_result(job)
        if stored:
            backend.mark_as_done(task_id, value)
        duration = job.duration
        runtime = duration.total_seconds() if duration is not None else None
        send_event("task-succeeded", uuid=task_id, result=saferepr(value), runtime=runtime)
    elif job.status in (Status.FAILED, Status.CANCELLED):
        error = failure_of(job)
        if stored:
            backend.mark_as_failure(task_id, error, call_errbacks=False)
        send_event("task-failed", uuid=task_id, exception=saferepr(error), traceback="")
    elif job.status == Status.RETRYING:
        # Not Celery's RETRY: result backends decode a RETRY result as an exception.
        error_text = mask_text(job.last_error, job.environment)
        meta = {
            "job_id": str(job.pk),
            "error": error_text,
            "retry_count": job.retry_count,
            "retry_at": job.scheduled_for.isoformat() if job.scheduled_for else None,
        }
        if stored:
            backend.store_result(task_id, meta, "RETRYING")
        send_event("task-retried", uuid=task_id, exception=saferepr(error_text))


def send_event(event_type: str, **fields: Any) -> None:
    """Publish one task event on the app's event exchange (best effort)."""
    if not app_settings.SEND_TASK_EVENTS:
        return
    global _dispatcher, _dispatcher_pid
    with _lock:
        try:
            if _dispatcher is None or _dispatcher_pid != os.getpid():
                # A dispatcher inherited across fork shares the parent's socket: never use it.
                app = current_app
                _dispatcher = app.events.Dispatcher(
                    app.connection_for_write(),
                    hostname=event_hostname,
                    enabled=True,
                    buffer_while_offline=False,
                )
                _dispatcher_pid = os.getpid()
            _dispatcher.send(event_type, **fields)
        except Exception as exc:  # the broker is down or the connection broke
            logger.info("could not send %s event (%s)", event_type, exc)
            _forget_dispatcher()


def _forget_dispatcher() -> None:
    global _dispatcher
    dispatcher, _dispatcher = _dispatcher, None
    if dispatcher is not None and _dispatcher_pid == os.getpid():
        try:
            dispatcher.close()
            dispatcher.connection.release()
        except Exception:  # already broken
            logger.debug("event dispatcher close failed", exc_info=True)


def _after_fork_in_child() -> None:
    # The lock may have been held by the watcher thread at fork time, and the dispatcher's
    # socket is the parent's: a child starts with neither.
    global _lock, _dispatcher
    _lock = threading.Lock()
    _dispatcher = None


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["failure_of", "publish", "send_event", "states"]
