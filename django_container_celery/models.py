"""The two tables of the app: Docker hosts and container jobs.

The ``ContainerJob`` row is the single source of truth about a job. Every status change
goes through :meth:`ContainerJob.transition_to`, which checks the transition table and
writes with one conditional UPDATE, so two processes racing on a job cannot both win.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Self

import django
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, router, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import states, validators
from .exceptions import InvalidTransition, OwnedFieldError, TransitionConflict
from .states import Status

if TYPE_CHECKING:
    from celery.result import AsyncResult

PRIORITY_HIGH = 80
PRIORITY_NORMAL = 50
PRIORITY_LOW = 20


def database_now() -> datetime:
    """The database server's current time.

    Leases, deadlines and retry times decide who owns a job, so they are computed from one
    clock shared by every worker: a worker whose own clock runs fast must not take over a
    live lease or kill a job early. SQLite runs on the worker's own machine: its clock.
    """
    from django.db import connection

    if connection.vendor != "postgresql":
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT STATEMENT_TIMESTAMP()")
        value = cursor.fetchone()[0]
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)


def check_constraint(condition: Q, name: str) -> models.CheckConstraint:
    """A CheckConstraint on Django 4.2 (``check=``) and 5.1+ (``condition=``) alike."""
    keyword = "condition" if django.VERSION >= (5, 1) else "check"
    options: dict[str, Any] = {keyword: condition}
    return models.CheckConstraint(name=name, **options)


def _keep_out_of_plain_save(
    instance: models.Model, kept_out: Collection[str], kwargs: dict[str, Any]
) -> None:
    """Make a plain ``save()`` of an existing row write every column but ``kept_out``:
    columns written by their own conditional UPDATEs, which a stale instance must not undo."""
    if instance._state.adding or kwargs.get("update_fields") is not None:
        return
    kwargs["update_fields"] = [
        field.name
        for field in instance._meta.concrete_fields
        if not field.primary_key and field.name not in kept_out
    ]


class ExecutorHost(models.Model):
    """A Docker daemon that runs jobs, with its capacity."""

    name = models.CharField(max_length=100, unique=True)
    connection_string = models.CharField(
        max_length=500,
        default="unix:///var/run/docker.sock",
        help_text=_("unix:///var/run/docker.sock or tcp://host:2376"),
    )
    tls_enabled = models.BooleanField(default=False)
    tls_verify = models.BooleanField(default=True)
    tls_ca_cert = models.CharField(max_length=500, blank=True, help_text=_("Path to ca.pem"))
    tls_client_cert = models.CharField(max_length=500, blank=True, help_text=_("Path to cert.pem"))
    tls_client_key = models.CharField(max_length=500, blank=True, help_text=_("Path to key.pem"))
    is_active = models.BooleanField(default=True)
    max_concurrent_jobs = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1)],
        help_text=_("Jobs this host may run at once (launching and running)."),
    )
    weight = models.PositiveIntegerField(
        default=100,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text=_("Relative share of unpinned jobs when several hosts have room."),
    )
    auto_pull_images = models.BooleanField(default=False)
    memory_capacity_mb = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(4)],
        help_text=_(
            "MiB the jobs holding slots here may use together (the sum of their memory "
            "limits). Empty: memory is not counted."
        ),
    )
    cpu_capacity = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01)],
        help_text=_(
            "Cores the jobs holding slots here may use together (the sum of their CPU "
            "limits). Empty: CPU is not counted."
        ),
    )
    unreachable_since = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text=_("Since when the daemon has not answered; empty while it answers."),
    )
    # Health: written by the engine only (``health.py``), one conditional UPDATE each.
    failures_in_row = models.PositiveIntegerField(
        default=0,
        editable=False,
        help_text=_("Calls to the daemon that failed in a row; a success resets it."),
    )
    unhealthy_since = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text=_(
            "Since when the host is unhealthy (HOST_FAILURES_BEFORE_UNHEALTHY failed calls in "
            "a row): no job starts here until a call succeeds. Empty: healthy."
        ),
    )
    health_error = models.TextField(
        blank=True, editable=False, help_text=_("The last failed call's error, while failing.")
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Written by the watcher and the launchers, never by a form saving a row it read earlier.
    ENGINE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"unreachable_since", "failures_in_row", "unhealthy_since", "health_error"}
    )

    class Meta:
        ordering = ["name"]
        constraints = [
            check_constraint(Q(max_concurrent_jobs__gte=1), "dcc_host_capacity_positive"),
            # A zero capacity would make every job "too big" and have dispatch fail it.
            check_constraint(
                Q(memory_capacity_mb__isnull=True) | Q(memory_capacity_mb__gte=4),
                "dcc_host_memory_capacity_range",
            ),
            check_constraint(
                Q(cpu_capacity__isnull=True) | Q(cpu_capacity__gte=0.01),
                "dcc_host_cpu_capacity_range",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        # The health fields are the engine's: a form saving a row it loaded earlier must not
        # write back stale values.
        _keep_out_of_plain_save(self, self.ENGINE_FIELDS, kwargs)
        super().save(*args, **kwargs)

    @property
    def is_healthy(self) -> bool:
        return self.unhealthy_since is None

    def active_job_count(self) -> int:
        """Slots in use: jobs launching or running, and ended jobs whose container could not
        be stopped yet."""
        return ContainerJob.objects.holding_slots().filter(assigned_host=self).count()


class Lane(models.Model):
    """A named share of the queue that jobs may join (``ContainerJob.lane``): an optional
    limit on how many of its jobs hold a slot at once, and a pause switch.

    A paused lane starts nothing new; its running jobs finish and its waiting jobs keep
    their place. Pausing and resuming go through ``lanes.pause`` / ``lanes.resume`` (the
    admin's actions, ``manage.py container_lanes``), which need the ``pause_lane``
    permission in the admin.
    """

    name = models.CharField(max_length=100, unique=True, validators=[validators.validate_lane_name])
    description = models.TextField(blank=True)
    max_concurrent_jobs = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text=_("Jobs of this lane that may hold a slot at once. Empty: no lane limit."),
    )
    is_paused = models.BooleanField(
        default=False, editable=False, help_text=_("No job of a paused lane starts.")
    )
    paused_at = models.DateTimeField(null=True, blank=True, editable=False)
    paused_by = models.CharField(max_length=150, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Written by pause and resume only: an edit form saving a stale row must not undo them.
    SWITCH_FIELDS: ClassVar[frozenset[str]] = frozenset({"is_paused", "paused_at", "paused_by"})

    class Meta:
        ordering = ["name"]
        constraints = [
            check_constraint(
                Q(max_concurrent_jobs__isnull=True) | Q(max_concurrent_jobs__gte=1),
                "dcc_lane_limit_positive",
            ),
        ]
        permissions = [("pause_lane", "Can pause and resume lanes")]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        _keep_out_of_plain_save(self, self.SWITCH_FIELDS, kwargs)
        super().save(*args, **kwargs)

    def holding_count(self) -> int:
        """Jobs of this lane holding a slot now."""
        return ContainerJob.objects.holding_slots().filter(lane=self.name).count()


class Installation(models.Model):
    """The identity of this installation: one row, the same for all of its processes.

    Every container carries its id as a label, so sweeps and cleanup on a daemon shared
    by several installations touch only their own containers.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return str(self.id)


class ContainerJobQuerySet(models.QuerySet["ContainerJob"]):
    def waiting(self) -> ContainerJobQuerySet:
        return self.filter(status__in=states.WAITING)

    def due(self, now: datetime | None = None) -> ContainerJobQuerySet:
        now = now or timezone.now()
        return self.filter(Q(scheduled_for__isnull=True) | Q(scheduled_for__lte=now))

    def ready(self, now: datetime | None = None) -> ContainerJobQuerySet:
        """Waiting, due and unclaimed, in launch order: priority, then FIFO."""
        return (
            self.waiting().due(now).filter(claimed_by="").order_by("-priority", "queued_at", "id")
        )

    def active(self) -> ContainerJobQuerySet:
        return self.filter(status__in=states.ACTIVE)

    def holding_slots(self) -> ContainerJobQuerySet:
        """Jobs counted against capacity: active ones, and ended ones whose container may
        still run because stopping it failed (``stop_pending``)."""
        return self.filter(Q(status__in=states.ACTIVE) | Q(stop_pending=True))

    def create_job(self, **fields: Any) -> ContainerJob:
        """Validate every field, then save: bad input raises ValidationError, saves nothing."""
        job = self.model(**fields)
        job.full_clean()
        job.save(force_insert=True)
        return job


_ACTIVE_Q = Q(status__in=sorted(states.ACTIVE))
_WAITING_Q = Q(status__in=sorted(states.WAITING))


class ContainerJob(models.Model):
    """One container to run: its definition, its place in the queue and its execution.

    A person writes the definition (``DEFINITION_FIELDS``); every other field but the
    record ones (``RECORD_FIELDS``, ``created_at``) belongs to the engine
    (:meth:`engine_fields`): status, queue, claim and execution state, which the queue and
    its workers write with conditional UPDATEs. :meth:`save` of an existing row therefore
    writes the definition and never puts back engine state an instance read earlier:

    * without ``update_fields`` it writes the definition and record fields, and an engine
      field only if this instance changed it since it read the row; afterwards the engine
      fields are reloaded from the row, so the instance shows what the row holds;
    * an engine field it would write (changed, or named in ``update_fields``) raises
      :class:`OwnedFieldError` while a worker holds the job (``claimed_by`` set, or
      ``launching``/``running``), and nothing is written;
    * a ``status`` change must be an edge of the transition table from the row's status
      (:class:`InvalidTransition`), and is refused with :class:`TransitionConflict` while a
      worker's claim is on the row or when the row moved since this instance read it.
    """

    Status = Status
    VALID_TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = states.VALID_TRANSITIONS
    # Fields a person defines; everything else is written by the queue and its workers.
    DEFINITION_FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "description",
        "docker_image",
        "command",
        "working_directory",
        "environment",
        "bind_mounts",
        "memory_limit",
        "cpu_limit",
        "timeout_seconds",
        "docker_host",
        "lane",
        "priority",
        "max_retries",
        "retry_strategy",
        "retry_exit_codes",
        "memory_retry_factor",
    )
    # Definition fields the engine also writes (an out-of-memory retry raises memory_limit):
    # a plain save() writes one only if this instance changed it since it read the row, so
    # an instance read before the retry does not put the old limit back.
    RAISED_BY_ENGINE: ClassVar[tuple[str, ...]] = ("memory_limit",)
    # Written by a plain save() besides the definition: neither the engine's nor defined.
    RECORD_FIELDS: ClassVar[tuple[str, ...]] = ("created_by", "updated_at")
    # Engine fields as this instance last read or wrote them (attname -> value): what
    # save() compares with to tell a change made on the instance from stale state.
    _engine_as_read: dict[str, Any]

    class RetryStrategyName(models.TextChoices):
        DEFAULT = "default", _("Default")
        AGGRESSIVE = "aggressive", _("Aggressive")
        CONSERVATIVE = "conservative", _("Conservative")
        HIGH_PRIORITY = "high_priority", _("High priority")

    # Definition
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    docker_image = models.CharField(
        max_length=255, validators=[validators.validate_image_reference]
    )
    command = models.TextField(
        blank=True,
        validators=[validators.validate_command],
        help_text=_("Split with shlex and run without a shell; write sh -c '…' for one."),
    )
    working_directory = models.CharField(max_length=255, blank=True)
    environment = models.JSONField(
        default=dict, blank=True, validators=[validators.validate_environment]
    )
    bind_mounts = models.JSONField(
        default=list,
        blank=True,
        validators=[validators.validate_bind_mounts],
        help_text=_("'host_path:container_path[:ro]' entries, from ALLOWED_BIND_MOUNTS only."),
    )
    memory_limit = models.PositiveIntegerField(
        null=True, blank=True, validators=[validators.validate_memory_limit], help_text="MiB"
    )
    cpu_limit = models.FloatField(
        null=True, blank=True, validators=[validators.validate_cpu_limit], help_text="cores"
    )
    timeout_seconds = models.PositiveIntegerField(
        default=3600, validators=[validators.validate_timeout]
    )
    docker_host = models.ForeignKey(
        ExecutorHost,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="pinned_jobs",
        help_text=_("Run on this host only. Empty: the app chooses a host with room."),
    )
    lane = models.CharField(
        max_length=100,
        blank=True,
        default="",
        validators=[validators.validate_lane_name],
        help_text=_(
            "A lane (Lanes in the admin) whose limit and pause apply to this job. Empty: no lane."
        ),
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Queue state
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    priority = models.PositiveSmallIntegerField(
        default=PRIORITY_NORMAL,
        validators=[validators.validate_priority],
        help_text=_("0-100, higher runs first."),
    )
    queued_at = models.DateTimeField(null=True, blank=True)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    launched_at = models.DateTimeField(null=True, blank=True)
    retry_count = models.PositiveIntegerField(default=0)
    max_retries = models.PositiveIntegerField(default=3, validators=[MaxValueValidator(100)])
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    retry_strategy = models.CharField(
        max_length=50,
        blank=True,
        default="",
        validators=[validators.validate_retry_strategy],
        help_text=_("default, aggressive, conservative, high_priority or a name from settings."),
    )
    retry_exit_codes = models.JSONField(
        default=list,
        blank=True,
        validators=[validators.validate_exit_codes],
        help_text=_("Exit codes that mean a transient failure: the job is retried."),
    )
    memory_retry_factor = models.FloatField(
        null=True,
        blank=True,
        validators=[validators.validate_memory_retry_factor],
        help_text=_(
            "When the container is killed for memory, retry with memory_limit times this "
            "(at most MAX_MEMORY_MB). Empty: an out-of-memory kill is not retried."
        ),
    )

    # Claim: which worker owns the current attempt, until when
    claimed_by = models.CharField(max_length=255, blank=True, default="")
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    attempt = models.PositiveIntegerField(
        default=0, help_text=_("Number of the current launch attempt; the first is 1.")
    )
    assigned_host = models.ForeignKey(
        ExecutorHost,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assigned_jobs",
        help_text=_("Host of the current attempt."),
    )
    dispatched_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the last Celery message was sent.")
    )
    takeover_count = models.PositiveIntegerField(
        default=0,
        help_text=_(
            "How many times a worker took the job over from an owner whose lease expired "
            "(a rescue)."
        ),
    )
    attempts_without_outcome = models.PositiveIntegerField(
        default=0,
        help_text=_(
            "Attempts that ended without an outcome: the container vanished (removed from "
            "outside, or lost with its host) or finishing kept failing. At "
            "MAX_ATTEMPTS_WITHOUT_OUTCOME the job fails and needs attention."
        ),
    )
    needs_attention = models.BooleanField(
        default=False,
        help_text=_(
            "Failed because its attempts kept ending without an outcome: an operator should "
            "look at its host or image before retrying it."
        ),
    )

    # Execution state
    execution_id = models.CharField(max_length=128, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    stdout_log = models.TextField(blank=True)
    stderr_log = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=255, blank=True)
    stop_pending = models.BooleanField(
        default=False,
        help_text=_(
            "The job ended but its container could not be stopped yet (its host did not "
            "answer); it keeps its host slot until the container is stopped."
        ),
    )

    objects = ContainerJobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            check_constraint(Q(priority__gte=0) & Q(priority__lte=100), "dcc_priority_range"),
            check_constraint(Q(retry_count__gte=0), "dcc_retry_count_gte_0"),
            check_constraint(
                Q(max_retries__gte=0) & Q(max_retries__lte=100), "dcc_max_retries_range"
            ),
            check_constraint(Q(status__in=[s.value for s in Status]), "dcc_status_known"),
        ]
        indexes = [
            # Serves the claim: first waiting job by priority, then FIFO.
            models.Index(
                models.F("priority").desc(),
                "queued_at",
                "id",
                name="dcc_ready_idx",
                condition=_WAITING_Q,
            ),
            # Serves capacity counts per host and the rescue of expired leases.
            models.Index(
                fields=["assigned_host", "lease_expires_at"],
                name="dcc_active_idx",
                condition=_ACTIVE_Q,
            ),
            # Serves the slot counts of every claim (global and per host): a job holds a
            # slot while active or while its container is still to be stopped, and that OR
            # can use no index of its own; without this one each claim reads the table.
            models.Index(
                fields=["assigned_host"],
                name="dcc_holding_idx",
                condition=_ACTIVE_Q | Q(stop_pending=True),
            ),
            models.Index(fields=["status", "completed_at"], name="dcc_status_completed_idx"),
            models.Index(fields=["created_at"], name="dcc_created_idx"),
            # Serve the dashboard and the metrics from the waiting rows alone, without
            # reading the table: the oldest waiting job (first entry), and how many are
            # ready or scheduled (an index-only scan of the backlog).
            models.Index(
                fields=["queued_at", "scheduled_for"],
                name="dcc_waiting_since_idx",
                condition=_WAITING_Q,
            ),
            # Serves the per-lane slot count of every claim when lanes have limits.
            models.Index(
                fields=["lane"],
                name="dcc_holding_lane_idx",
                condition=_ACTIVE_Q | Q(stop_pending=True),
            ),
            # The admin's lane filter: a lane's jobs, newest first, without reading the
            # other lanes' rows.
            models.Index(
                fields=["lane", "-created_at"],
                name="dcc_lane_created_idx",
                condition=~Q(lane=""),
            ),
            # The admin's "needs attention" filter and the dashboard's count of those jobs.
            models.Index(
                fields=["created_at"],
                name="dcc_attention_idx",
                condition=Q(status=Status.FAILED, needs_attention=True),
            ),
            # Counts and lists (newest first) jobs that failed before their container
            # started, which would otherwise read every failed job ever kept.
            models.Index(
                fields=["created_at"],
                name="dcc_launch_failed_idx",
                condition=Q(status=Status.FAILED, launched_at__isnull=True),
            ),
        ]
        permissions = [
            ("queue_containerjob", "Can queue, dequeue and retry container jobs"),
            ("cancel_containerjob", "Can cancel container jobs"),
        ]

    def __str__(self) -> str:
        return self.name or f"{self.docker_image} ({self.pk})"

    # -- persistence ----------------------------------------------------------------------

    def save(
        self,
        *,
        force_insert: bool | tuple[Any, ...] = False,
        force_update: bool = False,
        using: str | None = None,
        update_fields: Iterable[str] | None = None,
    ) -> None:
        """Insert a new job whole; on an existing one, never overwrite the engine's state.

        What is written and refused is described in the class docstring. The checks read
        the row under a row lock, so no worker can claim the job between them and the write.
        """
        options: dict[str, Any] = {"force_insert": force_insert, "force_update": force_update}
        if self._state.adding or force_insert:
            super().save(using=using, update_fields=update_fields, **options)
            self._remember_engine_state()
            return
        db = using or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=db):
            row = self._locked_engine_row(db)
            if row is None:  # deleted meanwhile: Django's own save inserts it again
                super().save(using=db, update_fields=update_fields, **options)
                self._remember_engine_state()
                return
            fields = self._fields_to_write(row, update_fields)
            super().save(using=db, update_fields=fields, **options)
        if update_fields is None:
            self._take_engine_state(row, written=fields)
        # A raised field this save wrote is not recorded as read: were the caller's
        # transaction rolled back, the next save must still see it as changed and write it.
        tracked = _tracked_attnames(type(self)) if update_fields is None else fields
        self._remember_engine_state(
            [name for name in tracked if not (name in self.RAISED_BY_ENGINE and name in fields)]
        )

    def clean_fields(self, exclude: Collection[str] | None = None) -> None:
        """Django's checks of each field, after refusing the definition values that its
        conversion would crash on or silently change and the text PostgreSQL cannot
        store (``validators.validate_raw_value``); errors are keyed by field name."""
        skipped = set(exclude or ())
        errors: dict[str, list[ValidationError]] = {}
        for name in self.DEFINITION_FIELDS:
            field = self._meta.get_field(name)
            if name in skipped or not isinstance(field, models.Field):
                continue
            try:
                validators.validate_raw_value(field, getattr(self, field.attname))
            except ValidationError as error:
                errors[name] = error.error_list
        try:
            super().clean_fields(exclude=skipped | set(errors))
        except ValidationError as error:
            errors.update(error.error_dict)
        if not errors and not skipped & {"memory_limit", "cpu_limit", "docker_host"}:
            errors.update(self._size_errors())
        if errors:
            raise ValidationError(errors)

    def full_clean(
        self,
        exclude: Iterable[str] | None = None,
        validate_unique: bool = True,
        validate_constraints: bool = True,
    ) -> None:
        """Django's checks, then the one that reads the database for the job's lane: it
        must exist. Not in :meth:`clean_fields`, so that ``container_task(lane=...)``
        checks the name's form at import time and the lane itself at each call; and
        skipped when ``lane`` is excluded (a form that does not edit it)."""
        excluded = set(exclude or ())
        errors: dict[str, Any] = {}
        try:
            super().full_clean(excluded, validate_unique, validate_constraints)
        except ValidationError as error:
            errors = error.update_error_dict(errors)
        if "lane" not in excluded and "lane" not in errors:
            errors.update(self._lane_errors())
        if errors:
            raise ValidationError(errors)

    def _lane_errors(self) -> dict[str, list[ValidationError]]:
        if not self.lane or Lane.objects.filter(name=self.lane).exists():
            return {}
        error = ValidationError(
            "Unknown lane %(lane)s: create it first (Lanes in the admin, or "
            "manage.py container_lanes set %(lane)s).",
            code="unknown_lane",
            params={"lane": self.lane},
        )
        return {"lane": [error]}

    def _size_errors(self) -> dict[str, list[ValidationError]]:
        """A job that may still be launched must fit some host it may run on (a record of
        one that ran is left alone: hosts may have shrunk since)."""
        if not (
            self._state.adding or self.status in (*states.WAITING, Status.PENDING, Status.FAILED)
        ):
            return {}
        from .placement import validate_fits_some_host  # placement reads these models

        try:
            validate_fits_some_host(self)
        except ValidationError as error:
            return error.error_dict
        return {}

    @classmethod
    def engine_fields(cls) -> tuple[str, ...]:
        """The fields the queue and its workers own: status, queue, claim and execution."""
        return tuple(_engine_attnames(cls))

    @classmethod
    def from_db(cls, *args: Any, **kwargs: Any) -> Self:
        instance = super().from_db(*args, **kwargs)
        instance._remember_engine_state()
        return instance

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        fields = kwargs.get("fields", args[1] if len(args) > 1 else None)
        self._remember_engine_state(fields)

    def _locked_engine_row(self, db: str) -> dict[str, Any] | None:
        attnames = _tracked_attnames(type(self)).values()
        rows = type(self)._default_manager.db_manager(db).select_for_update()
        return rows.filter(pk=self.pk).values(*attnames).first()

    def _fields_to_write(
        self, row: dict[str, Any], update_fields: Iterable[str] | None
    ) -> list[str]:
        """The fields to write, after refusing engine fields a worker owns right now."""
        engine = _engine_attnames(type(self))
        if update_fields is None:
            named = self._changed_engine_fields(row)
            fields = [*self._definition_and_record_fields(), *named]
        else:
            fields = [_field_name(type(self), name) for name in update_fields]
            named = [name for name in fields if name in engine]
        if "status" in named and self.status != row["status"]:
            self._check_status_move(row)
        owned = [name for name in named if name != "status"]
        if owned and _held_by_worker(row):
            raise OwnedFieldError(owned, self.pk, _holder(row))
        return fields

    def _definition_and_record_fields(self) -> list[str]:
        # A field left deferred was never read: writing it would load it just to write it.
        deferred = self.get_deferred_fields()
        attnames = _attnames(type(self))
        as_read = getattr(self, "_engine_as_read", {})
        names = [*self.DEFINITION_FIELDS, *self.RECORD_FIELDS]
        return [
            name
            for name in names
            if name == "updated_at"
            or (attnames[name] not in deferred and not self._unchanged_raised(name, as_read))
        ]

    def _unchanged_raised(self, name: str, as_read: dict[str, Any]) -> bool:
        attname = _attnames(type(self))[name]
        if name not in self.RAISED_BY_ENGINE or attname not in as_read:
            return False
        return bool(self.__dict__.get(attname) == as_read[attname])

    def _changed_engine_fields(self, row: dict[str, Any]) -> list[str]:
        """Engine fields this instance changed since it read them, to a value the row does
        not already hold. An instance that never read them (no record) changed none."""
        as_read = getattr(self, "_engine_as_read", {})
        changed = []
        for name, attname in _engine_attnames(type(self)).items():
            if attname not in self.__dict__ or attname not in as_read:
                continue
            value = self.__dict__[attname]
            if value != as_read[attname] and value != row[attname]:
                changed.append(name)
        return changed

    def _check_status_move(self, row: dict[str, Any]) -> None:
        current, new = str(row["status"]), self.status
        if not states.can_transition(current, new):
            raise InvalidTransition(current, new, self.pk)
        if row["claimed_by"]:
            reason = f"{_holder(row)}; its status changes through the queue manager"
            raise TransitionConflict(current, new, self.pk, reason)
        read = getattr(self, "_engine_as_read", {}).get("status", current)
        if read != current:
            reason = f"the row moved from '{read}' since this instance read it"
            raise TransitionConflict(current, new, self.pk, reason)

    def _take_engine_state(self, row: dict[str, Any], written: Iterable[str]) -> None:
        """Show the row's engine state on this instance, except the fields just written."""
        skip = set(written)
        for name, attname in _tracked_attnames(type(self)).items():
            if name not in skip:
                setattr(self, attname, row[attname])

    def _remember_engine_state(self, names: Iterable[str] | None = None) -> None:
        """Record the engine fields (all, or ``names``) as now read from or written to the
        row."""
        engine = _tracked_attnames(type(self))
        chosen = engine.values() if names is None else [engine[n] for n in names if n in engine]
        loaded = {attname: self.__dict__[attname] for attname in chosen if attname in self.__dict__}
        # A new dict each time: a copy.copy() of the instance must not share its record.
        self._engine_as_read = {**getattr(self, "_engine_as_read", {}), **loaded}

    # -- properties ------------------------------------------------------------------

    @property
    def is_queued(self) -> bool:
        return self.status in states.WAITING

    @property
    def is_final(self) -> bool:
        return self.status in states.FINAL

    @property
    def is_ready_to_launch(self) -> bool:
        if self.status not in states.WAITING or self.claimed_by:
            return False
        return self.scheduled_for is None or self.scheduled_for <= timezone.now()

    @property
    def queue_status(self) -> str:
        """not_queued, queued, scheduled, launched or launch_failed (see the docs)."""
        if self.status in states.WAITING:
            if self.scheduled_for is not None and self.scheduled_for > timezone.now():
                return "scheduled"
            return "queued"
        if self.status == Status.LAUNCHING:
            return "queued"
        if self.status == Status.PENDING:
            return "not_queued"  # dequeued, even if an earlier attempt ran
        if self.launched_at is not None:
            return "launched"
        if self.status == Status.FAILED:
            return "launch_failed"
        return "not_queued"

    @property
    def duration(self) -> timedelta | None:
        if self.started_at is None or self.completed_at is None:
            return None
        return self.completed_at - self.started_at

    @property
    def container_name(self) -> str:
        return container_name(self.pk, self.attempt)

    @property
    def command_args(self) -> list[str]:
        import shlex

        return shlex.split(self.command) if self.command else []

    # -- state machine ----------------------------------------------------------------

    def can_transition_to(self, status: str) -> bool:
        return states.can_transition(self.status, status)

    def transition_to(
        self,
        status: str,
        save: bool = True,
        *,
        as_claimant: bool = False,
        **fields: Any,
    ) -> None:
        """Move to ``status`` and set ``fields``, in one conditional UPDATE.

        The UPDATE matches only while the row still has the status this instance has
        (and, with ``as_claimant``, the same owner and attempt), so a racing process or a
        worker whose claim was taken over gets :class:`TransitionConflict` instead of
        overwriting newer state. With ``save=False`` only the instance changes.
        """
        old = self.status
        if not states.can_transition(old, status):
            raise InvalidTransition(old, status, self.pk)
        if save:
            changes = {"status": status, "updated_at": timezone.now(), **fields}
            filters: dict[str, Any] = {"pk": self.pk, "status": old}
            if as_claimant:
                filters.update(claimed_by=self.claimed_by, attempt=self.attempt)
            if not type(self).objects.filter(**filters).update(**changes):
                current = (
                    type(self).objects.filter(pk=self.pk).values_list("status", flat=True).first()
                )
                reason = (
                    f"the row is now '{current}'"
                    if current != old
                    else "the claim is held by another worker or attempt"
                )
                raise TransitionConflict(old, status, self.pk, reason)
            fields["updated_at"] = changes["updated_at"]
        self.status = status
        for name, value in fields.items():
            setattr(self, name, value)
        if save:
            self._remember_engine_state(["status", *fields])

    def update_as_claimant(self, **fields: Any) -> bool:
        """Write ``fields`` only while this instance's claim (owner, attempt) still holds."""
        matched = (
            type(self)
            .objects.filter(
                pk=self.pk, status=self.status, claimed_by=self.claimed_by, attempt=self.attempt
            )
            .update(**fields)
        )
        if matched:
            for name, value in fields.items():
                setattr(self, name, value)
            self._remember_engine_state(fields)
        return bool(matched)

    def mark_as_queued(self, scheduled_for: datetime | None = None, **fields: Any) -> None:
        self.transition_to(
            Status.QUEUED, queued_at=timezone.now(), scheduled_for=scheduled_for, **fields
        )

    def mark_as_running(self, *, as_claimant: bool = False, **fields: Any) -> None:
        now = database_now()  # the timeout is measured from here, by the database's clock
        self.transition_to(
            Status.RUNNING,
            as_claimant=as_claimant,
            **{"started_at": now, "launched_at": now, **fields},
        )

    def mark_as_completed(self, *, as_claimant: bool = False, **fields: Any) -> None:
        self.transition_to(
            Status.COMPLETED,
            as_claimant=as_claimant,
            # The same clock as started_at, so that durations hold under clock skew.
            completed_at=database_now(),
            **{**_CLEARED_CLAIM, **fields},
        )

    def mark_as_failed(
        self,
        should_retry: bool = False,
        error: str = "",
        *,
        as_claimant: bool = False,
        **fields: Any,
    ) -> None:
        """Fail the job, or with ``should_retry`` retry it if its ``max_retries`` allows.

        The engine does not call this with ``should_retry``: ``finishing.end_attempt``
        asks ``retry.get_retry_decision`` and calls :meth:`mark_as_retrying` itself.
        """
        if should_retry:
            from .retry import within_budget

            decision = within_budget(self)
            if decision.retry:
                self.mark_as_retrying(
                    decision.delay, error=error, as_claimant=as_claimant, **fields
                )
                return
        now = database_now()
        self.transition_to(
            Status.FAILED,
            as_claimant=as_claimant,
            completed_at=now,
            **{**_error_fields(error, now), **_CLEARED_CLAIM, **fields},
        )

    def mark_as_retrying(
        self, delay: float, error: str = "", *, as_claimant: bool = False, **fields: Any
    ) -> None:
        """Schedule the next attempt ``delay`` seconds from now (one more retry counted)."""
        now = database_now()
        self.transition_to(
            Status.RETRYING,
            as_claimant=as_claimant,
            retry_count=self.retry_count + 1,
            scheduled_for=now + timedelta(seconds=delay),
            # The message that ran this attempt is used up: dispatch sends the next.
            **{**_error_fields(error, now), **_CLEARED_CLAIM, "dispatched_at": None, **fields},
        )

    # -- Celery-style API ---------------------------------------------------------------

    def delay(self) -> AsyncResult:
        """Validate, save and queue the job now; the Celery task is sent when the
        transaction commits.

        The whole instance is validated first, always (``full_clean``), whether it is new
        or saved: an invalid one raises ``ValidationError`` naming each bad field and
        nothing is written. A new job is inserted; a saved one is written as ``save()``
        writes it, so definition fields changed on the instance are saved with the
        queueing, in the same transaction (and not at all if the queueing fails).
        """
        return self.apply_async()

    def apply_async(
        self,
        eta: datetime | None = None,
        countdown: float | None = None,
        priority: int | None = None,
        lane: str | None = None,
    ) -> AsyncResult:
        """Like :meth:`delay`, at ``eta`` or after ``countdown`` seconds, with ``priority``
        (0-100) and ``lane`` (an existing lane's name) for this job. The options are
        validated with the instance, before anything is written: ``eta`` an aware datetime
        (naive without USE_TZ), ``countdown`` a finite number of seconds, neither more than
        3650 days ahead; a ``ValidationError`` names each bad one (``{"eta": [...]}``)."""
        from .api import enqueue

        return enqueue(self, eta=eta, countdown=countdown, priority=priority, lane=lane)

    def cancel(self) -> bool:
        """Stop the job: a running container is stopped and removed. False if already final."""
        from .queue import queue_manager

        return queue_manager.cancel_job(self)

    def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> ContainerJob:
        """Block until the job is final, reading the database; TimeoutError when late."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.refresh_from_db()
            if self.is_final:
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Job {self.pk} is still '{self.status}' after {timeout} seconds"
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            time.sleep(
                poll_interval if remaining is None else max(0.0, min(poll_interval, remaining))
            )


_CLEARED_CLAIM: dict[str, Any] = {"claimed_by": "", "claimed_at": None, "lease_expires_at": None}


def _error_fields(error: str, now: datetime) -> dict[str, Any]:
    return {"last_error": error, "last_error_at": now} if error else {}


# -- what save() may write ------------------------------------------------------------------

# Never written by save() after the insert: the key, and when the job was created.
_FIXED_FIELDS = frozenset({"id", "created_at"})


@functools.cache
def _attnames(model: type[ContainerJob]) -> dict[str, str]:
    """Field name -> attname (``assigned_host`` -> ``assigned_host_id``) of every column."""
    return {field.name: field.attname for field in model._meta.concrete_fields}


@functools.cache
def _engine_attnames(model: type[ContainerJob]) -> dict[str, str]:
    """The engine's fields: every column that is neither the definition, a record field
    nor fixed. So a field added later is the engine's, never overwritten by a stale
    instance, until it is listed as definition."""
    kept = {*model.DEFINITION_FIELDS, *model.RECORD_FIELDS, *_FIXED_FIELDS}
    return {name: attname for name, attname in _attnames(model).items() if name not in kept}


@functools.cache
def _tracked_attnames(model: type[ContainerJob]) -> dict[str, str]:
    """The engine's fields and the definition fields it also writes: what an instance
    remembers as read, to tell its own changes from the row's."""
    attnames = _attnames(model)
    return {**_engine_attnames(model), **{n: attnames[n] for n in model.RAISED_BY_ENGINE}}


def _field_name(model: type[ContainerJob], name: str) -> str:
    # update_fields may name a foreign key by its attname (assigned_host_id).
    try:
        return model._meta.get_field(name).name
    except FieldDoesNotExist:
        return name  # Django's save reports the unknown field


def _held_by_worker(row: dict[str, Any]) -> bool:
    return bool(row["claimed_by"]) or row["status"] in states.ACTIVE


def _holder(row: dict[str, Any]) -> str:
    if row["claimed_by"]:
        return f"worker '{row['claimed_by']}' holds the job"
    return f"the job is {row['status']}"


def container_name(job_id: object, attempt: int) -> str:
    """The deterministic Docker name of one attempt of a job: ``dcc-<job id>-a<attempt>``."""
    return f"dcc-{job_id}-a{attempt}"


class AttemptReason(models.TextChoices):
    """How an attempt ended: the values of ``outcomes.End``, and those reserved for
    endings told apart later, so that recording one needs no migration."""

    EXITED = "exited", _("Exited")
    TIMED_OUT = "timed_out", _("Timed out")
    VANISHED = "vanished", _("Vanished")
    LAUNCH_FAILED = "launch_failed", _("Launch failed")
    CANCELLED = "cancelled", _("Cancelled")
    UNFINISHABLE = "unfinishable", _("Unfinishable")
    OUT_OF_MEMORY = "out_of_memory", _("Out of memory")


class JobAttempt(models.Model):
    """One ended attempt of a job: how it ended, where, and when.

    ``finishing.end_attempt`` writes exactly one row per attempt that ends (successful
    exits too), in the transaction of the job's own transition, so the history never
    shows an ending that the job row does not. Rows are never updated afterwards.
    """

    Reason = AttemptReason

    # The (job, attempt) index below serves the job's lookups, so the key needs none.
    job = models.ForeignKey(
        ContainerJob, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )
    attempt = models.PositiveIntegerField(help_text=_("The job's attempt number; the first is 1."))
    host = models.ForeignKey(
        ExecutorHost,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="attempts",
        help_text=_("Host the attempt ran on; empty: the default Docker host."),
    )
    # No database constraint on the values: an ending told apart later (out_of_memory)
    # must be recordable by code that runs before its migration.
    reason = models.CharField(max_length=32, choices=AttemptReason.choices)
    exit_code = models.IntegerField(null=True, blank=True)
    memory_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("The attempt's memory limit, MiB; empty: none.")
    )
    error = models.TextField(
        blank=True, help_text=_("What the job's last_error got, secrets masked; empty on success.")
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(help_text=_("By the database's clock."))
    retried = models.BooleanField(
        default=False, help_text=_("This ending put the job back in the queue for a retry.")
    )

    class Meta:
        ordering = ["attempt", "id"]
        indexes = [
            # A job's history, and how the attempt a job's row points at ended.
            models.Index(fields=["job", "attempt"], name="dcc_attempt_job_idx"),
            # The metrics' window: attempts that ended in the last hour or so.
            models.Index(fields=["ended_at"], name="dcc_attempt_ended_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} attempt {self.attempt}: {self.reason}"

    @property
    def succeeded(self) -> bool:
        return self.reason == AttemptReason.EXITED and self.exit_code == 0

    @property
    def run_time(self) -> timedelta | None:
        """From the container's start to the attempt's end; None if it never started."""
        if self.started_at is None:
            return None
        return self.ended_at - self.started_at
