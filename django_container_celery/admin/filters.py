"""The job list's filters: queue status, priority band and host.

Every filter is one indexed condition, so a filtered list of hundreds of thousands of jobs
costs no more than its page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .. import states
from ..models import PRIORITY_HIGH, PRIORITY_LOW, ExecutorHost
from ..states import Status

QUEUE_STATUS_CHOICES: list[tuple[str, Any]] = [
    ("not_queued", _("Not queued")),
    ("queued", _("Queued")),
    ("scheduled", _("Scheduled")),
    ("launched", _("Launched")),
    ("launch_failed", _("Launch failed")),
]
QUEUE_STATUS_LABELS = dict(QUEUE_STATUS_CHOICES)

_WAITING = sorted(states.WAITING)


def queue_status_q(value: str, now: datetime | None = None) -> Q | None:
    """The database condition for one ``ContainerJob.queue_status`` value (None if unknown).

    The five conditions mirror the property branch by branch and partition the table, so
    a filtered list and the badge on each row always agree.
    """
    now = now or timezone.now()
    waiting = Q(status__in=_WAITING)
    launching = Q(status=Status.LAUNCHING)
    later = Q(scheduled_for__gt=now)
    due = Q(scheduled_for__isnull=True) | Q(scheduled_for__lte=now)
    not_waiting = ~Q(status__in=[*_WAITING, Status.LAUNCHING])
    if value == "scheduled":
        return waiting & later
    if value == "queued":
        return (waiting & due) | launching
    pending = Q(status=Status.PENDING)
    if value == "launched":
        return not_waiting & ~pending & Q(launched_at__isnull=False)
    if value == "launch_failed":
        return Q(status=Status.FAILED, launched_at__isnull=True)
    if value == "not_queued":
        return pending | (not_waiting & ~Q(status=Status.FAILED) & Q(launched_at__isnull=True))
    return None


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
