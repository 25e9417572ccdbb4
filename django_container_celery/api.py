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
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from . import validators
from .exceptions import InvalidJobDefinition
from .masking import mask_data
from .models import ContainerJob, ExecutorHost, database_now
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


def validate_call_options(eta: Any = None, countdown: Any = None, priority: Any = None) -> None:
    """Check ``apply_async``'s calling options; a ``ValidationError`` keys each bad one by
    its own name (``eta``, ``countdown``, ``priority``). ``None`` means not given."""
    checks = (
        ("eta", eta, validators.validate_eta),
        ("countdown", countdown, validators.validate_countdown),
        ("priority", priority, validators.validate_priority),
    )
    errors: dict[str, list[ValidationError]] = {}
    for name, value, check in checks:
        if value is None:
            continue
        try:
            check(value)
        except ValidationError as error:
            errors[name] = error.error_list
    if errors:
        raise ValidationError(errors)


def _validate_for_queueing(
    job: ContainerJob,
    eta: Any = None,
    countdown: Any = None,
    priority: Any = None,
) -> None:
    """Check the call options and the whole job (``full_clean``), reporting both at once."""
    errors: dict[str, Any] = {}
    for check in (lambda: validate_call_options(eta, countdown, priority), job.full_clean):
        try:
            check()
        except ValidationError as error:
            errors = error.update_error_dict(errors)
    if errors:
        raise ValidationError(errors)


def enqueue(
    job: ContainerJob,
    eta: datetime | None = None,
    countdown: float | None = None,
    priority: int | None = None,
    lane: str | None = None,
) -> AsyncResult:
    """Validate, save and queue the job and, once the transaction commits, send its run
    message. ``lane``, when given, is set on the job first (and validated with it).

    Validation comes first and always, for a new instance and a saved one alike: the call
    options and the whole job (``full_clean``). Any problem raises one ``ValidationError``
    naming each bad field or option, and nothing is written. Then, in one transaction, the
    job is saved (a new one inserted; a saved one written as a plain ``save()`` writes it,
    so definition changes made on the instance are queued with it, and are rolled back
    with the queueing if that fails) and queued.

    A job due later gets no message now: ``dispatch_ready_jobs`` sends it when it is due.
    If the broker is down the job simply stays queued; dispatch sends it later. With
    Celery's ``task_always_eager`` the job runs here, to its end (see ``eager``); like an
    eager Celery task, it ignores ``eta`` and ``countdown`` (they are still validated).
    """
    from . import eager

    if lane is not None:
        job.lane, lane_before = lane, job.lane
        try:
            _validate_for_queueing(job, eta=eta, countdown=countdown, priority=priority)
        except ValidationError:
            job.lane = lane_before  # a refused call leaves the instance as it was
            raise
    else:
        _validate_for_queueing(job, eta=eta, countdown=countdown, priority=priority)
    run_here = eager.is_eager()
    if run_here:
        eta = countdown = None
    now = timezone.now()
    if countdown is not None:
        eta = now + timedelta(seconds=countdown)
    schedule_for = eta if eta is not None and eta > now else None
    task_id = job.celery_task_id or str(uuid.uuid4())
    with transaction.atomic():
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
    ).update(dispatched_at=database_now())
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
    return ContainerJob.objects.create_job(**_definition_from(template, definition))


def job_from(template: Any = None, **definition: Any) -> ContainerJob:
    """The same job as :func:`create_job_from`, unsaved and not yet validated: ``delay()``
    validates, saves and queues it in one go."""
    return ContainerJob(**_definition_from(template, definition))


def _definition_from(template: Any, definition: dict[str, Any]) -> dict[str, Any]:
    """The template's definition fields overridden by ``definition``, the host resolved.
    A template or host that does not exist is a ``ValidationError`` naming it."""
    unknown = set(definition) - set(DEFINITION_FIELDS)
    if unknown:
        raise TypeError(f"unknown job field(s): {', '.join(sorted(unknown))}")
    fields = {**_template_definition(template), **definition}
    if "docker_host" in fields:
        fields["docker_host"] = _resolve_host(fields["docker_host"])
    return fields


def _template_definition(template: Any) -> dict[str, Any]:
    if template is None or template == "":
        return {}
    try:
        source = ContainerJob.objects.get(pk=template)
    except (ContainerJob.DoesNotExist, ValidationError, ValueError, TypeError):
        raise ValidationError(
            {"template": f"No job with id {_shown(template)} to copy the definition of."}
        ) from None
    return {name: getattr(source, name) for name in DEFINITION_FIELDS}


def _resolve_host(value: Any) -> ExecutorHost | None:
    """The ExecutorHost a ``docker_host`` value names: a host, its id or its name."""
    problem = _host_problem(value)
    if problem:
        raise ValidationError({"docker_host": problem})
    if value is None or isinstance(value, ExecutorHost):
        return value
    by_id = isinstance(value, int)
    host = ExecutorHost.objects.filter(**{"pk" if by_id else "name": value}).first()
    if host is None:
        kind = "id" if by_id else "name"
        raise ValidationError({"docker_host": f"No executor host with {kind} {_shown(value)}."})
    return host


def _shown(value: Any) -> str:
    """A user's value, short, for an error message."""
    if isinstance(value, int) and abs(value) >= 10**18:
        return "(a number of more than 18 digits)"  # a huge int's repr may be refused
    return repr(value)[:100]


def _host_problem(value: Any) -> str | None:
    """What makes ``value`` unusable as a ``docker_host`` reference, found without the
    database; None when it may name a host."""
    if value is None or isinstance(value, ExecutorHost):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, str):
        if value and "\x00" not in value:
            return None
        return "A host name must be non-empty text without NUL characters."
    return f"Must be an ExecutorHost, its id or its name, not {type(value).__name__}."


def validate_definition(fields: dict[str, Any]) -> None:
    """Check the given definition fields with the model's own field validation, without
    the database (a host is only checked to be a host, an id or a name); a
    ``ValidationError`` names each bad field. Fields not given are not checked."""
    errors: dict[str, Any] = {}
    problem = _host_problem(fields.get("docker_host"))
    if problem:
        errors["docker_host"] = [problem]
    values = {name: value for name, value in fields.items() if name != "docker_host"}
    given = set(values)
    try:
        ContainerJob(**values).clean_fields(
            exclude={field.name for field in ContainerJob._meta.fields} - given
        )
    except ValidationError as error:
        errors = error.update_error_dict(errors)
    if errors:
        raise ValidationError(errors)


class ContainerTask:
    """A function that returns a command, run as a container job by Celery.

    Calling ``delay``/``apply_async`` creates and queues a ContainerJob and returns the
    job's AsyncResult; an invalid call raises ``ValidationError`` there and saves nothing.
    ``s()``/``si()`` are signatures of a Celery task that creates the job and runs it in the
    worker, so container tasks compose in chains and groups; there an invalid definition
    fails the step with :class:`~.exceptions.InvalidJobDefinition`.
    """

    def __init__(self, func: Callable[..., str], options: dict[str, Any]) -> None:
        self.func = func
        self.options = options
        self.name = options.pop("task_name", None) or f"{func.__module__}.{func.__name__}"
        functools.update_wrapper(self, func)
        # An invalid definition is the caller's mistake, not the worker's: listed in
        # ``throws``, it is logged at INFO without a traceback. A step retries itself for
        # as long as its job waits (the job's own retry budget bounds the attempts), so
        # Celery's default of three retries must not end it.
        self.task = shared_task(
            name=self.name,
            bind=True,
            acks_late=False,
            max_retries=None,
            throws=(InvalidJobDefinition,),
        )(_run_inline_factory(self))

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        return self.func(*args, **kwargs)

    def build_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ContainerJob:
        """Create and save (validated, pending) the job a call with these arguments
        defines, without queueing it."""
        return create_job_from(None, **self._definition(args, kwargs))

    def new_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ContainerJob:
        """The job a call with these arguments defines, unsaved and not yet validated."""
        return job_from(None, **self._definition(args, kwargs))

    def _definition(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        command = self.func(*args, **kwargs)
        if not isinstance(command, str):
            raise ValidationError(
                {
                    "command": f"{self.name} must return the command as a string, not "
                    f"{type(command).__name__}"
                }
            )
        return {"name": self.name, **self.options, "command": command}

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        priority: int | None = None,
        lane: str | None = None,
    ) -> AsyncResult:
        """Validate the call options, then build the job and queue it; nothing is saved
        unless all of it is valid (see :func:`enqueue`). ``lane`` replaces the task's own
        ``lane`` option for this call."""
        validate_call_options(eta=eta, countdown=countdown, priority=priority)
        job = self.new_job(tuple(args or ()), dict(kwargs or {}))
        return enqueue(job, eta=eta, countdown=countdown, priority=priority, lane=lane)

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
    name), ``lane`` (a lane's name), ``memory_retry_factor``, ``working_directory``,
    ``name``; plus ``task_name`` for the Celery task name.
    They are validated here, with the model's field validation: a ``ValidationError``
    names each bad one. A host name or id is looked up at each call, not here: module
    import must not need the database; so is a lane (its name's form is checked here).
    """
    unknown = set(options) - set(DEFINITION_FIELDS) - {"task_name"}
    if unknown:
        raise TypeError(f"container_task got unknown option(s): {', '.join(sorted(unknown))}")
    validate_definition(
        {"docker_image": image, **{k: v for k, v in options.items() if k != "task_name"}}
    )

    def decorate(func: Callable[..., str]) -> ContainerTask:
        return ContainerTask(func, {"docker_image": image, **options})

    return decorate
