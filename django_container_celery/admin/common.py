"""Small pieces every page of the console uses: time and badge formatting, and the 403 for
a posted action the user may not run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

TEMPLATES = "admin/django_container_celery/containerjob"
CSS = {"all": ("django_container_celery/admin.css",)}


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def short_when(value: datetime | None) -> SafeString:
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


def clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def badge(kind: str, value: str, label: Any) -> SafeString:
    return format_html('<span class="dcc-badge dcc-{}-{}">{}</span>', kind, value, label)


def flatten(fields: Any) -> list[str]:
    """The field names of a fieldset's ``fields``, rows of several fields included."""
    result: list[str] = []
    for item in fields:
        if isinstance(item, list | tuple):
            result.extend(item)
        else:
            result.append(item)
    return result


def never_show_facets(model_admin: type[admin.ModelAdmin]) -> type[admin.ModelAdmin]:
    """Turn off the filter facet counts (Django 5.0+): each is a count over the table.

    Django 4.2 has no facets, and no ``ShowFacets`` to name.
    """
    show_facets = getattr(admin, "ShowFacets", None)
    if show_facets is not None:
        model_admin.show_facets = show_facets.NEVER
    return model_admin


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


class JobAdminBase(ActionPermissionMixin, admin.ModelAdmin):
    """What every part of the job admin asks: may this user run an operation, and the
    names of the job admin's own URLs."""

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

    def _url_name(self, view: str) -> str:
        return f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_{view}"
