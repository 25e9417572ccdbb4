"""The Celery-style API: ``job.delay()``, ``job.apply_async()`` and ``@container_task``."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from celery import current_app, shared_task
from celery.canvas import Signature
from celery.result import AsyncResult
from django.db import transaction
from django.utils import timezone

from .masking import mask_data
from .models import ContainerJob, ExecutorHost
from .queue import queue_manager
from .routing import message_options

logger = logging.getLogger(__name__)

RUN_TASK = "django_container_celery.run_container_job"

DEFINITION_FIELDS = ContainerJob.DEFINITION_FIELDS


def job_result(job: ContainerJob) -> dict[str, Any]:
    """What a finished job's AsyncResult.get() returns, the job's secrets masked.

    It is stored in the result backend and sent in task events, both outside the app.
    """
    duration = job.duration
    result = {
        "job_id": str(job.pk),
        "status": job.status,
        "exit_code": job.exit_code,
        "stdout": job.stdout_log,
        "stderr": job.stderr_log,
        "attempt": job.attempt,
        "duration_seconds": duration.total_seconds() if duration is not None else None,
    }
    masked: dict[str, Any] = mask_data(result, job.environment)
    return masked


def enqueue(
    job: ContainerJob,
    eta: datetime | None = None,
    countdown: float | None = None,
    priority: int | None = None,
) -> AsyncResult:
    """Queue the job and, once the transaction commits, send its run message.

    A job due later gets no message now: ``dispatch_ready_jobs`` sends it when it is due.
    If the broker is down the job simply stays queued; dispatch sends it later. With
    Celery's ``task_always_eager`` the job runs here, to its end (see ``eager``); like an
    eager Celery task, it ignores ``eta`` and ``countdown``.
    """
    from . import eager

    run_here = eager.is_eager()
    if run_here:
        eta = countdown = None
    now = timezone.now()
    if countdown is not None:
        eta = now + timedelta(seconds=countdown)
    schedule_for = eta if eta is not None and eta > now else None
    task_id = job.celery_task_id or str(uuid.uuid4())
    with transaction.atomic():
        if job._state.adding:
            job.full_clean()
            job.save()
        queue_manager.queue_job(
            job, schedule_for=schedule_for, priority=priority, celery_task_id=task_id
        )
        if schedule_for is None and not run_here:
            transaction.on_commit(lambda: _send_if_unsent(job))
    if run_here:
        return eager.result_of(eager.run_to_end(job), propagate=eager.propagates())
    return AsyncResult(task_id, app=current_app)


def _send_if_unsent(job: ContainerJob) -> None:
    # The message carries only the job id; its options (priority, queue) come from the
    # instance that was just queued, so no second read of the row is needed.
    marked = ContainerJob.objects.filter(
        pk=job.pk, dispatched_at__isnull=True, claimed_by="", status__in=["queued", "retrying"]
    ).update(dispatched_at=timezone.now())
    if marked:
        send_run_message(job)


def send_run_message(job: ContainerJob) -> bool:
    """Publish the run message (job id only, the job's own task id); False if the broker
    refused, in which case the job is left for the next dispatch."""
    app = current_app
    options = message_options(job, app.conf.broker_url or "")
    if not job.celery_task_id:
        # Queued without delay() (the admin, the API): give it a task id now, so that its
        # result is stored where AsyncResult and Flower look.
        task_id = str(uuid.uuid4())
        if ContainerJob.objects.filter(pk=job.pk, celery_task_id="").update(celery_task_id=task_id):
            job.celery_task_id = task_id
        else:
            job.refresh_from_db(fields=["celery_task_id"])
    try:
        app.send_task(
            RUN_TASK,
            args=[str(job.pk)],
            task_id=job.celery_task_id or None,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            **options,
        )
    except Exception as exc:  # any publish failure leaves the job to dispatch
        logger.warning("job %s: could not send its run message (%s); dispatch will", job.pk, exc)
        queue_manager.forget_dispatch(job.pk)
        return False
    return True


def create_job_from(template: Any = None, **definition: Any) -> ContainerJob:
    """A new, validated, saved job from a template job's definition plus overrides."""
    fields: dict[str, Any] = {}
    if template:
        source = ContainerJob.objects.get(pk=template)
        fields = {name: getattr(source, name) for name in DEFINITION_FIELDS}
    unknown = set(definition) - set(DEFINITION_FIELDS)
    if unknown:
        raise TypeError(f"unknown job field(s): {', '.join(sorted(unknown))}")
    fields.update(definition)
    host = fields.get("docker_host")
    if isinstance(host, int):
        fields["docker_host"] = ExecutorHost.objects.get(pk=host)
    elif isinstance(host, str):
        fields["docker_host"] = ExecutorHost.objects.get(name=host)
    return ContainerJob.objects.create_job(**fields)


class ContainerTask:
    """A function that returns a command, run as a container job by Celery.

    Calling ``delay``/``apply_async`` creates and queues a ContainerJob and returns the
    job's AsyncResult. ``s()``/``si()`` are signatures of a Celery task that creates the job
    and runs it in the worker, so container tasks compose in chains and groups.
    """

    def __init__(self, func: Callable[..., str], options: dict[str, Any]) -> None:
        self.func = func
        self.options = options
        self.name = options.pop("task_name", None) or f"{func.__module__}.{func.__name__}"
        functools.update_wrapper(self, func)
        self.task = shared_task(name=self.name, bind=True, acks_late=False)(
            _run_inline_factory(self)
        )

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        return self.func(*args, **kwargs)

    def build_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ContainerJob:
        command = self.func(*args, **kwargs)
        if not isinstance(command, str):
            from django.core.exceptions import ValidationError

            raise ValidationError(
                {
                    "command": f"{self.name} must return the command as a string, not "
                    f"{type(command).__name__}"
                }
            )
        fields = {"name": self.name, **self.options, "command": command}
        return create_job_from(None, **fields)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        priority: int | None = None,
    ) -> AsyncResult:
        job = self.build_job(tuple(args or ()), dict(kwargs or {}))
        return job.apply_async(eta=eta, countdown=countdown, priority=priority)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return self.task.s(*args, **kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        return self.task.si(*args, **kwargs)


def _run_inline_factory(container_task: ContainerTask) -> Callable[..., dict[str, Any]]:
    def run_inline(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from .tasks import run_job_inline

        return run_job_inline(self, container_task, args, kwargs)

    run_inline.__name__ = container_task.func.__name__
    run_inline.__doc__ = container_task.func.__doc__
    return run_inline


def container_task(
    image: str,
    **options: Any,
) -> Callable[[Callable[..., str]], ContainerTask]:
    """Decorate a function returning a command string; it becomes a container task.

    Options are ContainerJob definition fields: ``priority``, ``max_retries``,
    ``timeout_seconds``, ``memory_limit``, ``cpu_limit``, ``environment``,
    ``retry_strategy``, ``retry_exit_codes``, ``docker_host`` (an ExecutorHost, id or
    name), ``working_directory``, ``name``; plus ``task_name`` for the Celery task name.
    """
    unknown = set(options) - set(DEFINITION_FIELDS) - {"task_name"}
    if unknown:
        raise TypeError(f"container_task got unknown option(s): {', '.join(sorted(unknown))}")

    def decorate(func: Callable[..., str]) -> ContainerTask:
        return ContainerTask(func, {"docker_image": image, **options})

    return decorate
