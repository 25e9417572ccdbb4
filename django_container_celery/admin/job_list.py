"""The job list: its columns, per-row buttons and search.

Built to stay fast on a table of hundreds of thousands of jobs: the unfiltered list counts
rows from PostgreSQL's planner estimate instead of scanning the table, hosts come in the
same query as the jobs, the big log columns are never loaded, and the per-row buttons are
decided from data already on the row and permissions read once.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .. import states
from ..models import PRIORITY_HIGH, PRIORITY_LOW, ContainerJob
from .common import JobAdminBase, badge, clip, short_when
from .filters import QUEUE_STATUS_LABELS
from .operations import OPERATIONS
from .outcome import current_error, current_exit_code, schedule_is_current
from .paginator import JobChangeList
from .search import search_jobs


class JobListAdmin(JobAdminBase):
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
            columns.insert(columns.index("state") + 1, row_actions)
        return columns

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        found = search_jobs(queryset, search_term)
        if found is not None:
            return found, False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description=_("Job"), ordering="-created_at")
    def job(self, job: ContainerJob) -> SafeString:
        title = clip(job.name or str(job.pk)[:8], 24)
        return format_html(
            '{}<br><span class="dcc-muted" title="{}">{}</span>',
            title,
            job.docker_image,
            clip(job.docker_image, 24),
        )

    @admin.display(description=_("Status"), ordering="status")
    def state(self, job: ContainerJob) -> SafeString:
        # Both states in one cell: the row's status, and under it where the job stands in
        # the queue, which is what the filters on the right select by. The lane, if any,
        # goes under them, cut to the badges' width so the list keeps its columns.
        badges = format_html("{}<br>{}", self.status_badge(job), self.queue_status_badge(job))
        if not job.lane:
            return badges
        return format_html(
            '{}<br><span class="dcc-muted dcc-lane" title="{}">{}</span>',
            badges,
            _("lane %(lane)s") % {"lane": job.lane},
            clip(job.lane, 12),
        )

    @admin.display(description=_("Queue status"))
    def queue_status_badge(self, job: ContainerJob) -> SafeString:
        value = job.queue_status
        return badge("qs", value, QUEUE_STATUS_LABELS.get(value, value))

    @admin.display(description=_("Status"), ordering="status")
    def status_badge(self, job: ContainerJob) -> SafeString:
        return badge("st", job.status, job.get_status_display())

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
        if job.scheduled_for is None or not schedule_is_current(job):
            return short_when(job.queued_at)
        return format_html(
            '{}<br><span class="dcc-muted">{} {}</span>',
            short_when(job.queued_at),
            _("due"),
            short_when(job.scheduled_for),
        )

    @admin.display(description=_("Ran"), ordering="completed_at")
    def ran(self, job: ContainerJob) -> SafeString:
        if job.launched_at is None:
            return format_html("{}", "-")
        duration = job.duration
        if duration is not None:
            took = f"{duration.total_seconds():.0f} s"
        else:
            took = str(_("running")) if job.status in states.ACTIVE else "-"
        return format_html(
            '{}<br><span class="dcc-muted">{}</span>', short_when(job.launched_at), took
        )

    @admin.display(description=_("Tries"))
    def retries(self, job: ContainerJob) -> str:
        return f"{job.retry_count} / {job.max_retries}"

    @admin.display(description=_("Host"))
    def host(self, job: ContainerJob) -> str:
        if job.assigned_host is not None:
            return job.assigned_host.name
        if job.docker_host is not None:
            return f"{job.docker_host.name} (pinned)"
        return "-"

    @admin.display(description=_("Exit"))
    def exit_code_shown(self, job: ContainerJob) -> SafeString:
        code = current_exit_code(job)
        if code is None:
            return format_html("{}", "-")
        return format_html(
            '<span class="dcc-exit dcc-exit-{}">{}</span>', "ok" if code == 0 else "bad", code
        )

    @admin.display(description=_("Error"))
    def error_summary(self, job: ContainerJob) -> SafeString:
        # The list loads only the head of each error (see JobChangeList).
        head = getattr(job, "error_head", None)
        error = current_error(job, head)
        if not error:
            return format_html("{}", "-")
        line = " ".join(error.split())
        return format_html(
            '<span class="dcc-error" title="{}">{}</span>', clip(line, 300), clip(line, 60)
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
