"""The job list's bulk actions. Each one runs an operation of ``operations`` on every
selected job and reports what it changed and what it skipped, and why."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseBase
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _

from ..models import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from .common import TEMPLATES, JobAdminBase, when
from .forms import ScheduleForm
from .operations import OPERATIONS, retry_one, run_operation, schedule_one, set_priority


class JobActionsAdmin(JobAdminBase):
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
                moment = form.cleaned_data["scheduled_for"]
                jobs = queryset.select_related("assigned_host", "docker_host").iterator(
                    chunk_size=500
                )
                verb = _("Scheduled for %(when)s:") % {"when": when(moment)}
                run_operation(jobs, verb, lambda job: schedule_one(job, moment)).send(request)
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
