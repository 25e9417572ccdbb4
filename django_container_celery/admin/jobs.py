"""Container jobs in the admin: the pieces put together, and a job's own page.

The list (``job_list``), the bulk actions (``job_actions``) and the extra pages
(``job_views``) are parts of one ``ModelAdmin``; this module holds its settings and the
change page, which leads with how the job stands and keeps what the workers write
read-only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib import admin, messages
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .. import placement, states
from ..masking import mask_environment
from ..models import ContainerJob
from ..states import Status
from .common import CSS, TEMPLATES, flatten, never_show_facets, when
from .filters import (
    HostFilter,
    LaneFilter,
    NeedsAttentionFilter,
    PriorityBandFilter,
    QueueStatusFilter,
)
from .forms import DEFINITION_FIELDS, LOCKED_STATUSES, ContainerJobForm, format_environment
from .job_actions import JobActionsAdmin
from .job_list import JobListAdmin
from .job_views import JobViewsAdmin
from .live import live_panel
from .logs import LOG_STREAMS, log_preview
from .operations import OPERATIONS
from .outcome import (
    attempt_rows,
    attempt_table,
    attention_note,
    current_error,
    earlier_error,
    schedule_is_current,
)
from .paginator import EstimatedCountPaginator

# Definition fields that only the actions change once the job exists: priority orders the
# queue, and the list's priority actions change it with the claim's rules in mind.
QUEUE_OWNED = ("priority",)


@admin.register(ContainerJob)
@never_show_facets
class ContainerJobAdmin(JobListAdmin, JobActionsAdmin, JobViewsAdmin):
    form = ContainerJobForm
    change_list_template = f"{TEMPLATES}/change_list.html"
    change_form_template = f"{TEMPLATES}/change_form.html"
    list_display = (
        "job",
        "state",
        "priority_display",
        "retries",
        "host",
        "queued",
        "ran",
        "exit_code_shown",
        "error_summary",
    )
    list_display_links = ("job",)
    list_filter = (
        QueueStatusFilter,
        "status",
        NeedsAttentionFilter,
        PriorityBandFilter,
        HostFilter,
        LaneFilter,
        ("created_at", admin.DateFieldListFilter),
        ("completed_at", admin.DateFieldListFilter),
    )
    list_select_related = ("assigned_host", "docker_host")
    # The default order, newest first, is served by the created_at index; the other sorts
    # offered cost one top-N sort of the filtered rows, and the rest are not offered.
    sortable_by = ("job", "priority_display", "queued", "ran")
    search_fields = ("name", "docker_image", "command")
    search_help_text = _(
        "Name, image or command (contains), or a job id or container name (exact)."
    )
    show_full_result_count = False
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
        css = {"all": (*CSS["all"], "django_container_celery/live_log.css")}
        js = ("django_container_celery/live_log.js",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        readonly = [
            name
            for fieldset in self.get_fieldsets(request, obj)
            for name in flatten(fieldset[1]["fields"])
            if name not in DEFINITION_FIELDS or name in QUEUE_OWNED
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
            _("Definition") if obj is not None else None,
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
                    ("docker_host", "lane"),
                    ("max_retries", "retry_strategy"),
                    "retry_exit_codes",
                    "memory_retry_factor",
                )
            },
        )
        if obj is None:
            return [definition, (_("Queue"), {"fields": ("priority",)})]
        if locked and obj.status in LOCKED_STATUSES:
            definition[1]["description"] = _(
                "This job is %(status)s: its definition is kept as it ran and can no "
                "longer be edited."
            ) % {"status": obj.get_status_display().lower()}
        return [
            self._outcome_fieldset(obj),
            *self._history_fieldsets(obj),
            definition,
            (
                _("Queue"),
                {
                    "description": _(
                        "Written by the queue and the workers; change it with the buttons "
                        "above or the list's actions (priority, schedule, retry)."
                    ),
                    "fields": (
                        "priority",
                        ("queued_at", "scheduled_for", "launched_at"),
                        ("retry_count", "dispatched_at"),
                        ("attempts_without_outcome", "needs_attention"),
                    )
                    if schedule_is_current(obj)
                    else (
                        "priority",
                        ("queued_at", "launched_at"),
                        "retry_count",
                        ("attempts_without_outcome", "needs_attention"),
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
                        ("started_at", "completed_at"),
                    )
                },
            ),
            (_("Logs"), self._logs_options(obj)),
            (_("Record"), {"fields": (("id", "created_by"), ("created_at", "updated_at"))}),
        ]

    def _outcome_fieldset(self, job: ContainerJob) -> tuple[Any, dict[str, Any]]:
        """How the job stands, first on its page: an operator opens a failed job for its
        error, and a running one for its output."""
        fields: list[Any] = [("status_badge", "queue_status_badge")]
        if job.needs_attention:
            fields.append("attention")
        if job.status in states.FINAL or job.status == Status.RETRYING:
            fields.append(("exit_code_shown", "duration_display"))
        if current_error(job):
            fields.append(("current_error_shown", "last_error_at"))
        if job.status in states.WAITING:
            # Asked only of waiting jobs: the answer reads every host's room.
            fields.append("why_waiting")
        if job.status in states.ACTIVE:
            fields.append("live_output")
        return (_("Outcome") if job.status in states.FINAL else _("Now"), {"fields": fields})

    def _logs_options(self, job: ContainerJob) -> dict[str, Any]:
        options: dict[str, Any] = {"fields": ("stdout_preview", "stderr_preview")}
        if job.status in states.ACTIVE and job.attempt > 1:
            # Logs are stored when an attempt ends: while the next one launches or runs,
            # the stored ones are the previous attempt's (its own are under Live output).
            options["description"] = _(
                "Stored when attempt %(previous)s ended; attempt %(current)s has not ended yet."
            ) % {"previous": job.attempt - 1, "current": job.attempt}
        return options

    def _history_fieldsets(self, job: ContainerJob) -> list[tuple[Any, dict[str, Any]]]:
        fields: list[str] = []
        attempts = attempt_rows(job)
        if attempts:
            fields.append("attempt_history")
        # The attempts table holds every earlier error; jobs that ended before attempts
        # were recorded have only the last one.
        if earlier_error(job) and not attempts:
            fields.append("earlier_error_shown")
        if job.scheduled_for is not None and not schedule_is_current(job):
            fields.append("was_scheduled_for")
        if not fields:
            return []
        return [(_("History"), {"fields": fields, "classes": ("dcc-history",)})]

    @admin.display(description=_("Needs attention"))
    def attention(self, job: ContainerJob) -> SafeString:
        return attention_note(job)

    @admin.display(description=_("Error"))
    def current_error_shown(self, job: ContainerJob) -> SafeString:
        # Masked: an error may quote the container's output, and so one of the secrets.
        return format_html('<pre class="dcc-error-text">{}</pre>', current_error(job))

    @admin.display(description=_("Error of an earlier attempt"))
    def earlier_error_shown(self, job: ContainerJob) -> SafeString:
        return format_html(
            '<pre class="dcc-error-text dcc-earlier">{}</pre><p class="dcc-muted">{}</p>',
            earlier_error(job),
            _(
                "Recorded %(when)s; the job has moved on since (it is %(status)s), so this "
                "is not its state."
            )
            % {"when": when(job.last_error_at), "status": job.get_status_display().lower()},
        )

    @admin.display(description=_("Attempts"))
    def attempt_history(self, job: ContainerJob) -> SafeString:
        return attempt_table(job, attempt_rows(job))

    @admin.display(description=_("Was scheduled for"))
    def was_scheduled_for(self, job: ContainerJob) -> str:
        return when(job.scheduled_for)

    @admin.display(description=_("Live output"))
    def live_output(self, job: ContainerJob) -> SafeString:
        return live_panel(job, reverse(self._url_name("live"), args=[job.pk]))

    @admin.display(description=_("Environment"))
    def environment_masked(self, job: ContainerJob) -> SafeString:
        env = mask_environment(job.environment or {})
        if not env:
            return format_html("{}", "-")
        # The edit form's notation, so a value holding a newline reads as one variable.
        return format_html('<pre class="dcc-env">{}</pre>', format_environment(env, masked=False))

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
