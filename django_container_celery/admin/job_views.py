"""The job admin's own pages: the queue dashboard, a job's full log, and the per-row
operation buttons' target."""

from __future__ import annotations

import uuid

from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext_lazy as _

from .common import TEMPLATES, JobAdminBase
from .dashboard import dashboard_data
from .filters import QUEUE_STATUS_CHOICES
from .live import live_tail_response
from .logs import LOG_STREAMS, log_text
from .operations import OPERATIONS, run_operation


class JobViewsAdmin(JobAdminBase):
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
            path("<path:object_id>/live/", wrap(self.live_view), name=f"{prefix}_live"),
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
        lanes_url = None
        if request.user.has_perm(f"{self.opts.app_label}.view_lane") or request.user.has_perm(
            f"{self.opts.app_label}.change_lane"
        ):
            lanes_url = reverse(f"{self.admin_site.name}:{self.opts.app_label}_lane_changelist")
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
            "attention_url": f"{changelist}?needs_attention=yes",
            "lanes_url": lanes_url,
            "media": self.media,
        }
        return TemplateResponse(request, f"{TEMPLATES}/dashboard_controls.html", context)

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

    def live_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        # A read, and one that asks the daemon: nothing else is answered.
        if request.method != "GET":
            return HttpResponseNotAllowed(["GET"])
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404("No such job.")
        return live_tail_response(job)

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
