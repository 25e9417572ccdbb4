"""The job list's filters (queue status, priority band, host, lane, needing attention) and
the host list's (health).

Every filter is one condition on the row. The queue status, priority and host filters
are served by indexes, so a filtered list of hundreds of thousands of jobs costs no more
than its page; the lane filter reads the list newest first until its page is full, and
the attention filter reads failed jobs only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin
from django.db.models import CharField, F, Q, QuerySet, Value
from django.db.models.functions import Cast
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .. import states
from ..models import PRIORITY_HIGH, PRIORITY_LOW, ExecutorHost, Lane
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


def filter_choices(request: HttpRequest) -> dict[str, list[tuple[str, str]]]:
    """The host and lane filters' choices, (value, label) by name, read in one query per
    request: the list's page must not cost a query more for each filter offered."""
    kept: dict[str, list[tuple[str, str]]] | None = getattr(request, "_dcc_choices", None)
    if kept is not None:
        return kept
    text = CharField()
    # Three annotations named and ordered alike on both sides: Django 4.2 selects
    # annotations in the order they were added, whatever values_list() asks.
    hosts = (
        ExecutorHost.objects.order_by()
        .annotate(
            kind=Value("host", output_field=text),
            value=Cast("pk", output_field=text),
            label=F("name"),
        )
        .values_list("kind", "value", "label")
    )
    lanes = (
        Lane.objects.order_by()
        .annotate(kind=Value("lane", output_field=text), value=F("name"), label=F("name"))
        .values_list("kind", "value", "label")
    )
    kept = {"host": [], "lane": []}
    for kind, value, label in sorted(hosts.union(lanes, all=True), key=lambda row: row[2]):
        kept[kind].append((value, label))
    request._dcc_choices = kept  # type: ignore[attr-defined]
    return kept


class HostFilter(admin.SimpleListFilter):
    """The host a job runs on: the one assigned to its attempt, or the one it is pinned to."""

    title = _("host")
    parameter_name = "host"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [*filter_choices(request)["host"], ("none", _("No host (default Docker)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        if value == "none":
            return queryset.filter(assigned_host__isnull=True, docker_host__isnull=True)
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(Q(assigned_host_id=value) | Q(docker_host_id=value))


# Not a lane name: those start with a letter or a digit (validators.validate_lane_name).
NO_LANE = "_none"


class LaneFilter(admin.SimpleListFilter):
    title = _("lane")
    parameter_name = "lane"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        lanes = filter_choices(request)["lane"]
        # Without lanes, the filter would only offer "No lane": it is left out.
        return [*lanes, (NO_LANE, _("No lane"))] if lanes else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(lane="" if value == NO_LANE else value)


# Only failed jobs need attention (a retry clears the mark): the condition on status lets
# the status index serve the filter and the dashboard's count.
NEEDS_ATTENTION_Q = Q(status=Status.FAILED, needs_attention=True)


class NeedsAttentionFilter(admin.SimpleListFilter):
    title = _("needs attention")
    parameter_name = "needs_attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Needs attention"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(NEEDS_ATTENTION_Q) if value == "yes" else queryset.none()


HOST_HEALTH: dict[str, tuple[Any, Q]] = {
    "healthy": (
        _("Healthy"),
        Q(unhealthy_since__isnull=True, failures_in_row=0, unreachable_since__isnull=True),
    ),
    "failing": (
        _("Failing"),
        Q(unhealthy_since__isnull=True)
        & (Q(failures_in_row__gt=0) | Q(unreachable_since__isnull=False)),
    ),
    "unhealthy": (_("Unhealthy"), Q(unhealthy_since__isnull=False)),
}


class HostHealthFilter(admin.SimpleListFilter):
    """The three states the host list's Health column shows."""

    title = _("health")
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(key, label) for key, (label, _q) in HOST_HEALTH.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        state = HOST_HEALTH.get(value)
        return queryset.none() if state is None else queryset.filter(state[1])
