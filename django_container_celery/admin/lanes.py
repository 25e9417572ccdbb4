"""Lanes in the admin: their limits, what they hold and keep waiting, and the pause switch.

Pausing and resuming are actions of their own, guarded by the ``pause_lane`` permission
rather than by the change permission: an operator on call may stop a lane without being
allowed to change its limit. The switch fields are never part of the form.

A lane that jobs not yet final still name cannot be deleted: without its row those jobs
would be held by neither its pause nor its limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .. import lanes, states
from ..models import ContainerJob, Lane
from .common import CSS, ActionPermissionMixin, clip, short_when


class LaneChangeList(ChangeList):
    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        # Counted for the page's lanes only, all of them in one query, and kept on each
        # row for the columns to read.
        rows = list(self.result_list)
        counts = lanes.lane_counts([lane.name for lane in rows])
        for lane in rows:
            lane.dcc_counts = counts.get(lane.name, (0, 0))
        self.result_list = rows


def counts_of(lane: Lane) -> tuple[int, int]:
    """(holding, waiting): from the list's one query, or asked for this lane alone."""
    kept: tuple[int, int] | None = getattr(lane, "dcc_counts", None)
    if kept is None:
        kept = lanes.lane_counts([lane.name]).get(lane.name, (0, 0))
        lane.dcc_counts = kept  # type: ignore[attr-defined]
    return kept


@admin.register(Lane)
class LaneAdmin(ActionPermissionMixin, admin.ModelAdmin):
    list_display = ("name", "limit", "pause_state", "holding", "waiting", "description_short")
    list_filter = ("is_paused",)
    search_fields = ("name", "description")
    # A new lane starts unpaused and holds nothing: its form asks only for what is set.
    add_fields = ("name", "description", "max_concurrent_jobs")
    change_fields = (
        "name",
        "description",
        "max_concurrent_jobs",
        "pause_state",
        ("holding", "waiting"),
        ("created_at", "updated_at"),
    )
    actions = ("pause_lanes", "resume_lanes")

    class Media:
        css = CSS

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LaneChangeList

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.add_fields if obj is None else self.change_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        # Jobs name their lane: renaming it would leave them naming a lane that no longer
        # exists, outside its limit and its pause.
        return ["name", "pause_state", "holding", "waiting", "created_at", "updated_at"]

    def has_pause_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.pause_lane")

    def get_deleted_objects(
        self, objs: Sequence[Lane] | QuerySet[Lane], request: HttpRequest
    ) -> tuple[list[Any], dict[Any, int], set[str], list[Any]]:
        """Django's answer, with every lane that jobs not yet final name as protected: the
        delete page and the ``delete_selected`` action then refuse and say why."""
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        names = sorted({lane.name for lane in objs})
        not_final = Q(status__in=sorted(states.WAITING | states.ACTIVE)) | Q(stop_pending=True)
        in_use = dict(
            ContainerJob.objects.filter(lane__in=names)
            .filter(not_final)
            .order_by()
            .values("lane")
            .annotate(n=Count("pk"))
            .values_list("lane", "n")
        )
        protected = list(protected)
        for name in names:
            if in_use.get(name):
                count = int(in_use[name])
                protected.append(
                    ngettext(
                        "lane %(name)s: %(count)d job not final names it",
                        "lane %(name)s: %(count)d jobs not final name it",
                        count,
                    )
                    % {"name": name, "count": count}
                )
        return deleted, model_count, perms_needed, protected

    # -- columns ------------------------------------------------------------------------

    @admin.display(description=_("Limit"), ordering="max_concurrent_jobs")
    def limit(self, lane: Lane) -> str:
        limit = lane.max_concurrent_jobs
        return str(_("no limit")) if limit is None else str(limit)

    @admin.display(description=_("Paused"), ordering="is_paused")
    def pause_state(self, lane: Lane) -> SafeString:
        if not lane.is_paused:
            return format_html('<span class="dcc-host-ok">{}</span>', _("no"))
        since = short_when(lane.paused_at)
        if lane.paused_by:
            return format_html(
                '<span class="dcc-host-down">{}</span> <span class="dcc-muted">{} {} {} {}</span>',
                _("paused"),
                _("since"),
                since,
                _("by"),
                lane.paused_by,
            )
        return format_html(
            '<span class="dcc-host-down">{}</span> <span class="dcc-muted">{} {}</span>',
            _("paused"),
            _("since"),
            since,
        )

    @admin.display(description=_("Holding a slot"))
    def holding(self, lane: Lane) -> SafeString:
        holding, _waiting = counts_of(lane)
        limit = lane.max_concurrent_jobs
        if limit is None:
            return format_html("{}", holding)
        return format_html(
            '<span class="{}">{} / {}</span>',
            "dcc-load-full" if holding >= limit else "",
            holding,
            limit,
        )

    @admin.display(description=_("Waiting"))
    def waiting(self, lane: Lane) -> SafeString:
        _holding, waiting = counts_of(lane)
        jobs = reverse(f"{self.admin_site.name}:{self.opts.app_label}_containerjob_changelist")
        return format_html(
            '<a href="{}?{}" title="{}">{}</a>',
            jobs,
            urlencode({"lane": lane.name}),
            _("Jobs of this lane"),
            waiting,
        )

    @admin.display(description=_("Description"))
    def description_short(self, lane: Lane) -> str:
        return clip(" ".join(lane.description.split()), 80) or "-"

    # -- actions ------------------------------------------------------------------------

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        self.refuse_forbidden_action(request)
        return super().changelist_view(request, extra_context=extra_context)

    @admin.action(description=_("Pause selected lanes"), permissions=["pause"])
    def pause_lanes(self, request: HttpRequest, queryset: QuerySet[Lane]) -> None:
        if not self.has_pause_permission(request):
            raise PermissionDenied
        selected = dict(queryset.order_by("name").values_list("name", "is_paused"))
        to_pause = [name for name, paused in selected.items() if not paused]
        changed = lanes.pause(to_pause, by=request.user.get_username()) if to_pause else 0
        if changed:
            self.message_user(
                request,
                ngettext(
                    "Paused %(count)d lane (%(names)s): none of its jobs starts until it is "
                    "resumed; jobs already running finish.",
                    "Paused %(count)d lanes (%(names)s): none of their jobs starts until they "
                    "are resumed; jobs already running finish.",
                    changed,
                )
                % {"count": changed, "names": ", ".join(to_pause)},
                messages.SUCCESS,
            )
        already = [name for name, paused in selected.items() if paused]
        if already:
            self.message_user(
                request,
                _("Already paused, left as they were: %(names)s.") % {"names": ", ".join(already)},
                messages.WARNING,
            )
        elif not changed:
            self.message_user(request, _("No lane was paused."), messages.WARNING)

    @admin.action(description=_("Resume selected lanes"), permissions=["pause"])
    def resume_lanes(self, request: HttpRequest, queryset: QuerySet[Lane]) -> None:
        if not self.has_pause_permission(request):
            raise PermissionDenied
        selected = dict(queryset.order_by("name").values_list("name", "is_paused"))
        to_resume = [name for name, paused in selected.items() if paused]
        changed = lanes.resume(to_resume) if to_resume else 0
        if changed:
            self.message_user(
                request,
                ngettext(
                    "Resumed %(count)d lane (%(names)s): its waiting jobs may start again.",
                    "Resumed %(count)d lanes (%(names)s): their waiting jobs may start again.",
                    changed,
                )
                % {"count": changed, "names": ", ".join(to_resume)},
                messages.SUCCESS,
            )
        running = [name for name, paused in selected.items() if not paused]
        if running:
            self.message_user(
                request,
                _("Not paused, left as they were: %(names)s.") % {"names": ", ".join(running)},
                messages.WARNING,
            )
        elif not changed:
            self.message_user(request, _("No lane was resumed."), messages.WARNING)
