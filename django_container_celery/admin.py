"""The operator's console: the Django admin of container jobs and executor hosts.

Built to stay fast on a table of hundreds of thousands of jobs: the unfiltered list counts
rows from PostgreSQL's planner estimate instead of scanning the table, hosts come in the
same query as the jobs, the big log columns are never loaded for the list, and the
per-row buttons are decided from data already on the row and permissions read once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from concurrent import futures
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections, transaction
from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext_lazy as _

from . import placement, states
from .admin_views import (
    LOG_STREAMS,
    OPERATIONS,
    QUEUE_STATUS_CHOICES,
    dashboard_data,
    log_preview,
    log_text,
    queue_status_q,
    retry_one,
    run_operation,
    schedule_one,
    set_priority,
    with_load,
)
from .exceptions import ExecutorError
from .executors import executor_for
from .forms import (
    DEFINITION_FIELDS,
    LOCKED_STATUSES,
    ContainerJobForm,
    ScheduleForm,
    format_environment,
    quote_value,
)
from .hosts import cpu_use, memory_use, read_capacity, write_capacity
from .masking import mask_environment, mask_text
from .models import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, ContainerJob, ExecutorHost

TEMPLATES = "admin/django_container_celery/containerjob"
QUEUE_STATUS_LABELS = dict(QUEUE_STATUS_CHOICES)

# Never loaded for the list, which shows none of them: each log alone may hold
# LOG_MAX_BYTES, and a hundred rows of logs would dwarf the page.
LIST_DEFERRED = ("stdout_log", "stderr_log", "description", "last_error", "command")


# -- list filters ------------------------------------------------------------------------


class QueueStatusFilter(admin.SimpleListFilter):
    title = _("queue status")
    parameter_name = "queue_status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return QUEUE_STATUS_CHOICES

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        condition = queue_status_q(value)
        return queryset.none() if condition is None else queryset.filter(condition)


PRIORITY_BANDS: dict[str, tuple[Any, Q]] = {
    "high": (_("High (80+)"), Q(priority__gte=PRIORITY_HIGH)),
    "normal": (
        _("Normal (21-79)"),
        Q(priority__gt=PRIORITY_LOW, priority__lt=PRIORITY_HIGH),
    ),
    "low": (_("Low (20 or less)"), Q(priority__lte=PRIORITY_LOW)),
}


class PriorityBandFilter(admin.SimpleListFilter):
    title = _("priority")
    parameter_name = "priority_band"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(key, label) for key, (label, _q) in PRIORITY_BANDS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        band = PRIORITY_BANDS.get(value)
        return queryset.none() if band is None else queryset.filter(band[1])


class HostFilter(admin.SimpleListFilter):
    """The host a job runs on: the one assigned to its attempt, or the one it is pinned to."""

    title = _("host")
    parameter_name = "host"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        hosts = [(str(pk), name) for pk, name in ExecutorHost.objects.values_list("pk", "name")]
        return [*hosts, ("none", _("No host (default Docker)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        if value == "none":
            return queryset.filter(assigned_host__isnull=True, docker_host__isnull=True)
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(Q(assigned_host_id=value) | Q(docker_host_id=value))


# -- counting ----------------------------------------------------------------------------


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered large table from the planner's statistics, not a scan.

    ``COUNT(*)`` over hundreds of thousands of rows costs a full scan on PostgreSQL, on
    every page load, for a number an operator reads as "about how many". Filtered lists
    are counted exactly: their counts are smaller and people act on them.
    """

    # Below this estimated size an exact count is cheap enough.
    estimate_above = 50_000

    count_is_estimate = False

    @cached_property
    def count(self) -> int:
        estimate = self.estimated_count()
        if estimate is not None:
            self.count_is_estimate = True
            return estimate
        exact: int = super().count
        return exact

    def estimated_count(self) -> int | None:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return None
        query = queryset.query
        if query.has_filters() or query.distinct or query.is_sliced:
            return None
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            return None
        table = connection.ops.quote_name(queryset.model._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", [table]
            )
            row = cursor.fetchone()
        # reltuples is -1 (or 0) for a table never analyzed: then count for real.
        if row is None or row[0] is None or row[0] < self.estimate_above:
            return None
        return int(row[0])


class JobChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, *args: Any, **kwargs: Any) -> QuerySet[Any]:
        return super().get_queryset(request, *args, **kwargs).defer(*LIST_DEFERRED)


# -- shared permission handling -----------------------------------------------------------


class ActionPermissionMixin:
    """Refuse a posted action the user may not run with 403, not a quiet redirect.

    Django drops an action missing from the user's choices and answers "No action
    selected"; an operator's script or a stale page then believes nothing was wrong.
    """

    def refuse_forbidden_action(self, request: HttpRequest) -> None:
        if request.method != "POST":
            return
        names = [name for name in request.POST.getlist("action") if name]
        if not names:
            return
        model_admin: Any = self
        known = {a if isinstance(a, str) else a.__name__ for a in model_admin.actions or ()}
        known |= {name for name, _func in model_admin.admin_site.actions}
        allowed = set(model_admin.get_actions(request))
        if any(name in known and name not in allowed for name in names):
            raise PermissionDenied


# -- container jobs ----------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def _short_when(value: datetime | None) -> SafeString:
    """Month, day and minute (the year only when it is not this one); all of it on hover."""
    if value is None:
        return format_html("{}", "-")
    local = timezone.localtime(value)
    # strftime, not Django's date filter: four of these per row are a visible part of
    # rendering a hundred rows.
    shown = "%m-%d %H:%M" if local.year == timezone.localdate().year else "%Y-%m-%d %H:%M"
    return format_html(
        '<span class="dcc-time" title="{}">{}</span>',
        local.strftime("%Y-%m-%d %H:%M:%S"),
        local.strftime(shown),
    )


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _badge(kind: str, value: str, label: Any) -> SafeString:
    return format_html('<span class="dcc-badge dcc-{}-{}">{}</span>', kind, value, label)


_JOB_ID_RE = re.compile(
    r"(?:dcc-)?([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12})(?:-a\d+)?"
)


def parse_job_id(term: str) -> uuid.UUID | None:
    """A job id from a search term: the id itself, or a container name ``dcc-<id>-a<n>``."""
    match = _JOB_ID_RE.fullmatch(term.strip())
    if match is None:
        return None
    try:
        return uuid.UUID(match.group(1))
    except ValueError:
        return None


@admin.register(ContainerJob)
class ContainerJobAdmin(ActionPermissionMixin, admin.ModelAdmin):
    form = ContainerJobForm
    change_list_template = f"{TEMPLATES}/change_list.html"
    change_form_template = f"{TEMPLATES}/change_form.html"
    list_display = (
        "job",
        "queue_status_badge",
        "status_badge",
        "priority_display",
        "retries",
        "host",
        "queued",
        "scheduled",
        "launched",
        "finished",
        "environment_summary",
    )
    list_display_links = ("job",)
    list_filter = (
        QueueStatusFilter,
        "status",
        PriorityBandFilter,
        HostFilter,
        ("created_at", admin.DateFieldListFilter),
        ("completed_at", admin.DateFieldListFilter),
    )
    list_select_related = ("assigned_host", "docker_host")
    # The default order, newest first, is served by the created_at index; the other sorts
    # offered cost one top-N sort of the filtered rows, and the rest are not offered.
    sortable_by = ("job", "priority_display", "queued", "finished")
    search_fields = ("name", "docker_image", "command")
    search_help_text = _(
        "Name, image or command (contains), or a job id or container name (exact)."
    )
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator: ClassVar[type] = EstimatedCountPaginator
    list_per_page = 100
    actions = (
        "queue_jobs",
        "dequeue_jobs",
        "cancel_jobs",
        "retry_failed_jobs",
        "retry_failed_jobs_reset_count",
        "schedule_for_later",
        "set_priority_high",
        "set_priority_normal",
        "set_priority_low",
    )

    class Media:
        css = {"all": ("django_container_celery/admin.css",)}

    # -- permissions ---------------------------------------------------------------------

    def has_queue_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.queue_containerjob")

    def has_cancel_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.cancel_containerjob")

    def may_run(self, request: HttpRequest, permission: str) -> bool:
        """Change permission plus the operation's own ("queue" or "cancel")."""
        if not self.has_change_permission(request):
            return False
        check: Callable[[HttpRequest], bool] = getattr(self, f"has_{permission}_permission")
        return check(request)

    # -- list ----------------------------------------------------------------------------

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return JobChangeList

    def get_list_display(self, request: HttpRequest) -> Any:
        # Permissions are read here, once per request, so that drawing a hundred rows of
        # buttons never asks the database again.
        allowed = [op for op in OPERATIONS.values() if self.may_run(request, op.permission)]
        url_name = f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_operation"

        @admin.display(description=_("Actions"))
        def row_actions(job: ContainerJob) -> SafeString:
            buttons = [
                (reverse(url_name, args=[job.pk, op.name]), op.name, op.label)
                for op in allowed
                if job.status in op.statuses
            ]
            return format_html_join(
                " ",
                '<button type="submit" form="dcc-row-action-form" formaction="{}" '
                'class="dcc-row-button dcc-row-{}">{}</button>',
                buttons,
            )

        columns: list[Any] = list(self.list_display)
        if allowed:
            # Next to the states the buttons act on, so they stay in view on narrow screens.
            columns.insert(columns.index("status_badge") + 1, row_actions)
        return columns

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        job_id = parse_job_id(search_term)
        if job_id is not None:
            return queryset.filter(pk=job_id), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description=_("Job"), ordering="-created_at")
    def job(self, job: ContainerJob) -> SafeString:
        title = job.name or str(job.pk)[:8]
        return format_html('{}<br><span class="dcc-muted">{}</span>', title, job.docker_image)

    @admin.display(description=_("Queue status"))
    def queue_status_badge(self, job: ContainerJob) -> SafeString:
        value = job.queue_status
        return _badge("qs", value, QUEUE_STATUS_LABELS.get(value, value))

    @admin.display(description=_("Status"), ordering="status")
    def status_badge(self, job: ContainerJob) -> SafeString:
        return _badge("st", job.status, job.get_status_display())

    @admin.display(description=_("Priority"), ordering="priority")
    def priority_display(self, job: ContainerJob) -> SafeString:
        band = (
            "high"
            if job.priority >= PRIORITY_HIGH
            else ("low" if job.priority <= PRIORITY_LOW else "normal")
        )
        return format_html('<span class="dcc-prio dcc-prio-{}">{}</span>', band, job.priority)

    @admin.display(description=_("Queued"), ordering="queued_at")
    def queued(self, job: ContainerJob) -> SafeString:
        return _short_when(job.queued_at)

    @admin.display(description=_("Scheduled for"))
    def scheduled(self, job: ContainerJob) -> SafeString:
        return _short_when(job.scheduled_for)

    @admin.display(description=_("Launched"))
    def launched(self, job: ContainerJob) -> SafeString:
        return _short_when(job.launched_at)

    @admin.display(description=_("Finished"), ordering="completed_at")
    def finished(self, job: ContainerJob) -> SafeString:
        return _short_when(job.completed_at)

    @admin.display(description=_("Retries"))
    def retries(self, job: ContainerJob) -> str:
        return f"{job.retry_count} / {job.max_retries}"

    @admin.display(description=_("Host"))
    def host(self, job: ContainerJob) -> str:
        if job.assigned_host is not None:
            return job.assigned_host.name
        if job.docker_host is not None:
            return f"{job.docker_host.name} (pinned)"
        return "-"

    @admin.display(description=_("Environment"))
    def environment_summary(self, job: ContainerJob) -> SafeString:
        env = mask_environment(job.environment or {})
        if not env:
            return format_html("{}", "-")
        shown = [_clip(f"{key}={quote_value(value)}", 32) for key, value in list(env.items())[:3]]
        more = f" (+{len(env) - 3})" if len(env) > 3 else ""
        return format_html(
            '<span class="dcc-env-summary">{}{}</span>',
            format_html_join(mark_safe("<br>"), "{}", ((line,) for line in shown)),
            more,
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        self.refuse_forbidden_action(request)
        extra = {
            "dcc_dashboard_url": reverse(self._url_name("dashboard")),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=extra)

    # -- change form ---------------------------------------------------------------------

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        readonly = [
            name
            for fieldset in self.get_fieldsets(request, obj)
            for name in _flatten(fieldset[1]["fields"])
            if name not in DEFINITION_FIELDS
        ]
        if self.definition_locked(request, obj):
            # "environment" itself is listed so that the form drops the field: only the
            # masked display (environment_masked) appears on the page.
            readonly += DEFINITION_FIELDS
        return readonly

    def definition_locked(self, request: HttpRequest, obj: ContainerJob) -> bool:
        return obj.status in LOCKED_STATUSES or not self.has_change_permission(request, obj)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        locked = obj is not None and self.definition_locked(request, obj)
        env = "environment_masked" if locked else "environment"
        definition: tuple[Any, dict[str, Any]] = (
            None,
            {
                "fields": (
                    "name",
                    "description",
                    "docker_image",
                    "command",
                    "working_directory",
                    env,
                    "bind_mounts",
                    ("memory_limit", "cpu_limit", "timeout_seconds"),
                    "docker_host",
                )
            },
        )
        queue_settings = ("priority", "max_retries", "retry_strategy", "retry_exit_codes")
        if obj is None:
            return [definition, (_("Queue"), {"fields": queue_settings})]
        state_note = _("Written by the queue and the workers; change it with the actions above.")
        # Asked only of waiting jobs: the answer reads every host's room.
        waiting = ("why_waiting",) if obj.status in states.WAITING else ()
        if locked and obj.status in LOCKED_STATUSES:
            definition[1]["description"] = _(
                "This job is %(status)s: its definition is kept as it ran and can no "
                "longer be edited."
            ) % {"status": obj.get_status_display().lower()}
        return [
            definition,
            (
                _("Queue"),
                {
                    "description": state_note,
                    "fields": (
                        *queue_settings,
                        ("queue_status_badge", "status_badge"),
                        ("queued_at", "scheduled_for", "launched_at"),
                        *waiting,
                        ("retry_count", "dispatched_at"),
                        ("last_error_at", "last_error_masked"),
                    ),
                },
            ),
            (
                _("Container"),
                {
                    "fields": (
                        ("container_name", "execution_id"),
                        ("attempt", "assigned_host"),
                        ("claimed_by", "claimed_at", "lease_expires_at"),
                        "celery_task_id",
                        ("exit_code", "started_at", "completed_at", "duration_display"),
                    )
                },
            ),
            (_("Logs"), {"fields": ("stdout_preview", "stderr_preview")}),
            (_("Record"), {"fields": (("id", "created_by"), ("created_at", "updated_at"))}),
        ]

    @admin.display(description=_("Environment"))
    def environment_masked(self, job: ContainerJob) -> SafeString:
        env = mask_environment(job.environment or {})
        if not env:
            return format_html("{}", "-")
        # The edit form's notation, so a value holding a newline reads as one variable.
        return format_html('<pre class="dcc-env">{}</pre>', format_environment(env, masked=False))

    @admin.display(description=_("Last error"))
    def last_error_masked(self, job: ContainerJob) -> str:
        # An error may quote the container's output, and so one of the job's secrets.
        return mask_text(job.last_error, job.environment)

    @admin.display(description=_("Why is this job waiting?"))
    def why_waiting(self, job: ContainerJob) -> SafeString:
        return format_html(
            '<ul class="dcc-why-waiting">{}</ul>',
            format_html_join("", "<li>{}</li>", ((line,) for line in placement.why_waiting(job))),
        )

    @admin.display(description=_("Container name"))
    def container_name(self, job: ContainerJob) -> str:
        return job.container_name if job.attempt else "-"

    @admin.display(description=_("Duration"))
    def duration_display(self, job: ContainerJob) -> str:
        duration = job.duration
        return "-" if duration is None else f"{duration.total_seconds():.1f} s"

    def _log_field(self, job: ContainerJob, stream: str) -> SafeString:
        text, cut = log_preview(job, stream)
        url = reverse(self._url_name("logs"), args=[job.pk, stream])
        if not text:
            return format_html('<span class="dcc-muted">{}</span>', _("(empty)"))
        note = _("Showing the last %(n)s characters.") % {"n": len(text)} if cut else ""
        return format_html(
            '<pre class="dcc-log">{}</pre><p>{} <a href="{}">{}</a></p>',
            text,
            note,
            url,
            _("Full log"),
        )

    @admin.display(description=_("Standard output"))
    def stdout_preview(self, job: ContainerJob) -> SafeString:
        return self._log_field(job, "stdout")

    @admin.display(description=_("Standard error"))
    def stderr_preview(self, job: ContainerJob) -> SafeString:
        return self._log_field(job, "stderr")

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> Any:
        if obj is not None and not add:
            context["dcc_operations"] = [
                {"url": reverse(self._url_name("operation"), args=[obj.pk, op.name]), **vars(op)}
                for op in OPERATIONS.values()
                if obj.status in op.statuses and self.may_run(request, op.permission)
            ]
            context["dcc_log_urls"] = {
                stream: reverse(self._url_name("logs"), args=[obj.pk, stream])
                for stream in LOG_STREAMS
            }
            if obj.status in LOCKED_STATUSES:
                # Nothing on the page can be saved any more; the tools above still act.
                context.update(
                    show_save=False, show_save_and_continue=False, show_save_and_add_another=False
                )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if not change:
            if obj.created_by_id is None and request.user.is_authenticated:
                obj.created_by = request.user
            obj.save()
            return
        if obj.status in LOCKED_STATUSES:
            if any(name in request.POST for name in DEFINITION_FIELDS):
                self._refuse_save(request, obj.status)
            return
        fields = [name for name in form.changed_data if name in DEFINITION_FIELDS]
        if not fields:
            return
        with transaction.atomic():
            # The row lock keeps a worker from claiming the job between this check and the
            # write; the worker's own state fields are never part of the write.
            status = (
                ContainerJob.objects.select_for_update()
                .filter(pk=obj.pk)
                .values_list("status", flat=True)
                .first()
            )
            if status is None or status in LOCKED_STATUSES:
                self._refuse_save(request, status or "deleted")
                return
            obj.save(update_fields=[*fields, "updated_at"])

    def _refuse_save(self, request: HttpRequest, status: str) -> None:
        request._dcc_save_refused = True  # type: ignore[attr-defined]
        self.message_user(
            request,
            _(
                "The job is now %(status)s, so its definition can no longer change; "
                "your edits were not saved."
            )
            % {"status": status},
            messages.ERROR,
        )

    def response_change(self, request: HttpRequest, obj: Any) -> HttpResponse:
        if getattr(request, "_dcc_save_refused", False):
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if getattr(request, "_dcc_save_refused", False):
            return None
        return super().log_change(request, obj, message)

    # -- extra views ---------------------------------------------------------------------

    def _url_name(self, view: str) -> str:
        return f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_{view}"

    def get_urls(self) -> list[URLPattern]:
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        own = [
            path("dashboard/", wrap(self.dashboard_view), name=f"{prefix}_dashboard"),
            path(
                "<path:object_id>/logs/<str:stream>/",
                wrap(self.log_view),
                name=f"{prefix}_logs",
            ),
            path(
                "<path:object_id>/operation/<str:operation>/",
                wrap(self.operation_view),
                name=f"{prefix}_operation",
            ),
        ]
        return own + super().get_urls()

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        changelist = reverse(self._url_name("changelist"))
        data = dashboard_data()
        context = {
            **self.admin_site.each_context(request),
            **data,
            "title": _("Container job queue"),
            "opts": self.opts,
            "changelist_url": changelist,
            "queue_links": [
                (label, f"{changelist}?queue_status={value}")
                for value, label in QUEUE_STATUS_CHOICES
            ],
            "status_links": [
                (status, count, f"{changelist}?status__exact={status}")
                for status, count in data["stats"]["by_status"].items()
            ],
            "media": self.media,
        }
        return TemplateResponse(request, f"{TEMPLATES}/dashboard.html", context)

    def log_view(self, request: HttpRequest, object_id: str, stream: str) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        if stream not in LOG_STREAMS:
            raise Http404(f"No log stream {stream!r}; use stdout or stderr.")
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404("No such job.")
        response = HttpResponse(log_text(job, stream), content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'inline; filename="{job.pk}-{stream}.log"'
        return response

    def operation_view(self, request: HttpRequest, object_id: str, operation: str) -> HttpResponse:
        op = OPERATIONS.get(operation)
        if op is None:
            raise Http404(f"No operation {operation!r}.")
        if not self.may_run(request, op.permission):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        try:
            job_id = uuid.UUID(unquote(object_id))
        except ValueError:
            raise Http404("No such job.") from None
        queryset = self.get_queryset(request).select_related("assigned_host", "docker_host")
        found = queryset.filter(pk=job_id).first()
        if found is None:
            raise Http404("No such job.")
        run_operation([found], op.verb, op.run).send(request)
        target = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            target = reverse(self._url_name("changelist"))
        return HttpResponseRedirect(target)

    # -- actions -------------------------------------------------------------------------

    def _run(self, request: HttpRequest, queryset: QuerySet[Any], name: str) -> None:
        op = OPERATIONS[name]
        if not self.may_run(request, op.permission):
            raise PermissionDenied
        jobs = queryset.select_related("assigned_host", "docker_host").iterator(chunk_size=500)
        run_operation(jobs, op.verb, op.run).send(request)

    @admin.action(description=_("Queue selected jobs"), permissions=["change", "queue"])
    def queue_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._run(request, queryset, "queue")

    @admin.action(
        description=_("Dequeue selected jobs (back to pending)"), permissions=["change", "queue"]
    )
    def dequeue_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._run(request, queryset, "dequeue")

    @admin.action(
        description=_("Cancel selected jobs (stops running containers)"),
        permissions=["change", "cancel"],
    )
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._run(request, queryset, "cancel")

    @admin.action(description=_("Retry failed jobs"), permissions=["change", "queue"])
    def retry_failed_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._run(request, queryset, "retry")

    @admin.action(
        description=_("Retry failed jobs, resetting their retry count"),
        permissions=["change", "queue"],
    )
    def retry_failed_jobs_reset_count(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        if not self.may_run(request, "queue"):
            raise PermissionDenied
        jobs = queryset.select_related("assigned_host", "docker_host").iterator(chunk_size=500)
        report = run_operation(
            jobs,
            _("Queued again with a fresh retry count"),
            lambda job: retry_one(job, reset_count=True),
        )
        report.send(request)

    @admin.action(description=_("Schedule for later…"), permissions=["change", "queue"])
    def schedule_for_later(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> HttpResponseBase | None:
        if not self.may_run(request, "queue"):
            raise PermissionDenied
        if "apply" in request.POST:
            form = ScheduleForm(request.POST)
            if form.is_valid():
                when = form.cleaned_data["scheduled_for"]
                jobs = queryset.select_related("assigned_host", "docker_host").iterator(
                    chunk_size=500
                )
                verb = _("Scheduled for %(when)s:") % {"when": _when(when)}
                run_operation(jobs, verb, lambda job: schedule_one(job, when)).send(request)
                return None
        else:
            form = ScheduleForm(initial={"scheduled_for": ScheduleForm.default_time()})
        count = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": _("Schedule jobs for later"),
            "opts": self.opts,
            "form": form,
            "jobs": list(
                queryset.select_related(None).only("pk", "name", "docker_image", "status")[:20]
            ),
            "job_count": count,
            "more_count": max(0, count - 20),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, f"{TEMPLATES}/schedule.html", context)

    def _priority(self, request: HttpRequest, queryset: QuerySet[Any], value: int) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        set_priority(queryset, value, _("Set priority %(value)s on") % {"value": value}).send(
            request
        )

    @admin.action(description=_("Set priority high (80)"), permissions=["change"])
    def set_priority_high(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._priority(request, queryset, PRIORITY_HIGH)

    @admin.action(description=_("Set priority normal (50)"), permissions=["change"])
    def set_priority_normal(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._priority(request, queryset, PRIORITY_NORMAL)

    @admin.action(description=_("Set priority low (20)"), permissions=["change"])
    def set_priority_low(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._priority(request, queryset, PRIORITY_LOW)


def _flatten(fields: Any) -> list[str]:
    result: list[str] = []
    for item in fields:
        if isinstance(item, list | tuple):
            result.extend(item)
        else:
            result.append(item)
    return result


# -- executor hosts ----------------------------------------------------------------------

# Seconds the admin waits for daemons to answer a check; a host that is down must not
# hold the operator's page for the Docker client's full timeout.
PING_TIMEOUT = 10.0


T = TypeVar("T")


def ask_hosts(
    hosts: list[ExecutorHost], ask: Callable[[ExecutorHost], T], timeout: float = PING_TIMEOUT
) -> list[tuple[ExecutorHost, T | None, str | None]]:
    """Ask every host's daemon at once; (host, answer, None) when it answered, else
    (host, None, error). ``ask`` runs in a thread, so it must not use the database."""
    if not hosts:
        return []
    pool = futures.ThreadPoolExecutor(max_workers=min(8, len(hosts)))
    try:
        pending = {pool.submit(ask, host): host for host in hosts}
        futures.wait(pending, timeout=timeout)
        results: list[tuple[ExecutorHost, T | None, str | None]] = []
        for future, host in pending.items():
            if not future.done():
                results.append((host, None, f"no answer within {timeout:g} s"))
                continue
            error = future.exception()
            if error is None:
                results.append((host, future.result(), None))
            elif isinstance(error, ExecutorError):
                results.append((host, None, str(error)))
            else:
                results.append((host, None, f"{type(error).__name__}: {error}"))
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ping_hosts(
    hosts: list[ExecutorHost], timeout: float = PING_TIMEOUT
) -> list[tuple[ExecutorHost, str | None]]:
    """Ping every host's daemon at once; (host, None) when it answered, else the error."""

    def ping(host: ExecutorHost) -> None:
        executor_for(host).ping()

    return [(host, error) for host, _answer, error in ask_hosts(hosts, ping, timeout)]


@admin.register(ExecutorHost)
class ExecutorHostAdmin(ActionPermissionMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "connection_string",
        "is_active",
        "reachability",
        "load",
        "max_concurrent_jobs",
        "weight",
        "tls_enabled",
        "auto_pull_images",
    )
    list_filter = ("is_active", "tls_enabled")
    search_fields = ("name", "connection_string")
    readonly_fields = ("load", "reachability", "created_at", "updated_at")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "connection_string",
                    "is_active",
                    "reachability",
                    "auto_pull_images",
                )
            },
        ),
        (
            _("Capacity"),
            {
                "fields": (
                    "max_concurrent_jobs",
                    "weight",
                    "load",
                    ("memory_capacity_mb", "cpu_capacity"),
                )
            },
        ),
        (
            _("TLS"),
            {
                "fields": (
                    "tls_enabled",
                    "tls_verify",
                    "tls_ca_cert",
                    "tls_client_cert",
                    "tls_client_key",
                )
            },
        ),
        (_("Record"), {"fields": ("created_at", "updated_at")}),
    )
    actions = ("check_daemon", "read_capacity_from_daemon")

    class Media:
        css = {"all": ("django_container_celery/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[ExecutorHost]:
        return with_load(super().get_queryset(request))

    def get_list_display(self, request: HttpRequest) -> Any:
        # Every host's room comes from one query, read when the first row is drawn and
        # kept for this request only (the admin object itself is shared by all requests).
        rooms: dict[int, placement.HostRoom] | None = None

        def room_of(host: ExecutorHost) -> placement.HostRoom | None:
            nonlocal rooms
            if rooms is None:
                rooms = {room.host_id: room for room in placement.host_rooms()}
            return rooms.get(host.pk)

        @admin.display(description=_("Memory"))
        def memory(host: ExecutorHost) -> str:
            room = room_of(host)
            return "-" if room is None else memory_use(room)

        @admin.display(description=_("CPU"))
        def cpu(host: ExecutorHost) -> str:
            room = room_of(host)
            return "-" if room is None else cpu_use(room)

        columns: list[Any] = list(self.list_display)
        columns[columns.index("load") + 1 : columns.index("load") + 1] = [memory, cpu]
        return columns

    @admin.display(description=_("Current load"), ordering="active_jobs")
    def load(self, host: ExecutorHost) -> SafeString:
        active = int(getattr(host, "active_jobs", 0) or 0)
        capacity = host.max_concurrent_jobs
        percent = min(100, round(100 * active / capacity)) if capacity else 0
        return format_html(
            '<span class="dcc-load{}" title="{}%">{} / {}</span>',
            " dcc-load-full" if active >= capacity else "",
            percent,
            active,
            capacity,
        )

    @admin.display(description=_("Daemon"), ordering="unreachable_since")
    def reachability(self, host: ExecutorHost) -> SafeString:
        # Set by the watcher's reconcile pass; its running jobs stay running meanwhile.
        since = host.unreachable_since
        if since is None:
            return format_html('<span class="dcc-host-ok">{}</span>', _("answers"))
        return format_html(
            '<span class="dcc-host-down" title="{}">{}</span>',
            _("Running jobs stay running until the daemon answers or they are cancelled."),
            _("unreachable since %(since)s")
            % {"since": date_format(timezone.localtime(since), "DATETIME_FORMAT")},
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        self.refuse_forbidden_action(request)
        return super().changelist_view(request, extra_context=extra_context)

    @admin.action(description=_("Check that the Docker daemon answers"), permissions=["change"])
    def check_daemon(self, request: HttpRequest, queryset: QuerySet[ExecutorHost]) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        for host, error in ping_hosts(list(queryset)):
            if error is None:
                self.message_user(
                    request,
                    _("%(host)s: the Docker daemon at %(url)s answers.")
                    % {"host": host.name, "url": host.connection_string},
                    messages.SUCCESS,
                )
            else:
                self.message_user(
                    request,
                    _("%(host)s: no answer from %(url)s: %(error)s")
                    % {"host": host.name, "url": host.connection_string, "error": error},
                    messages.ERROR,
                )

    @admin.action(
        description=_("Read memory and CPU capacity from the daemon"), permissions=["change"]
    )
    def read_capacity_from_daemon(
        self, request: HttpRequest, queryset: QuerySet[ExecutorHost]
    ) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        # Daemons are asked from threads; the rows are written here, on this request's
        # own connection and transaction.
        for host, capacity, error in ask_hosts(list(queryset), read_capacity):
            if capacity is None:
                self.message_user(
                    request,
                    _("%(host)s: could not read the capacity from %(url)s: %(error)s")
                    % {"host": host.name, "url": host.connection_string, "error": error},
                    messages.ERROR,
                )
                continue
            memory, cpus = capacity
            write_capacity(host, memory, cpus)
            self.message_user(
                request,
                _("%(host)s: memory capacity set to %(memory)s MiB, CPU capacity to %(cpus)s.")
                % {"host": host.name, "memory": memory, "cpus": f"{cpus:g}"},
                messages.SUCCESS,
            )


__all__ = [
    "ContainerJobAdmin",
    "EstimatedCountPaginator",
    "ExecutorHostAdmin",
    "HostFilter",
    "PriorityBandFilter",
    "QueueStatusFilter",
    "ask_hosts",
    "parse_job_id",
    "ping_hosts",
]
