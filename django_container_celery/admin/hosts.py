"""Executor hosts in the admin: health, load and capacity, and asking their daemons.

The list reads everything it shows in a fixed number of queries, whatever the number of
hosts: health is on the host rows, the slot count is a subquery of the list's own query,
and memory and CPU use come from one read of every host's room.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from datetime import datetime
from typing import Any, TypeVar

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .. import health, placement
from ..exceptions import ExecutorError
from ..executors import executor_for
from ..hosts import cpu_use, memory_use, read_capacity, write_capacity
from ..models import ExecutorHost
from .common import CSS, ActionPermissionMixin
from .dashboard import with_load
from .filters import HostHealthFilter

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


def _local(moment: datetime) -> str:
    # Short, as the job list writes times: the column must not push the list sideways.
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


@admin.register(ExecutorHost)
class ExecutorHostAdmin(ActionPermissionMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "connection_string",
        "is_active",
        "health",
        "load",
        "max_concurrent_jobs",
        "weight",
        "tls_enabled",
        "auto_pull_images",
    )
    list_filter = ("is_active", HostHealthFilter, "tls_enabled")
    search_fields = ("name", "connection_string")
    readonly_fields = ("load", "health", "health_error", "created_at", "updated_at")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "connection_string",
                    "is_active",
                    "health",
                    "health_error",
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
        css = CSS

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

    @admin.display(description=_("Health"), ordering="failures_in_row")
    def health(self, host: ExecutorHost) -> SafeString:
        # Written by the launchers and the reconcile pass (health.py); the error of the
        # last failed call is in the tooltip, and in full on the host's page.
        error = host.health_error or ""
        if host.unhealthy_since is not None:
            return format_html(
                '<span class="dcc-host-down" title="{}">{}</span>',
                error,
                _("unhealthy since %(since)s") % {"since": _local(host.unhealthy_since)},
            )
        if host.failures_in_row:
            return format_html(
                '<span class="dcc-host-down" title="{}">{}</span>',
                error,
                _("failing: %(count)s in a row") % {"count": host.failures_in_row},
            )
        if host.unreachable_since is not None:
            # Never written alone since failures are counted (health.record_failure sets
            # both, record_success clears both); only a row marked by an older version,
            # before migration 0007, shows this, until the host's next probe.
            return format_html(
                '<span class="dcc-host-down" title="{}">{}</span>',
                _("Running jobs stay running until the daemon answers or they are cancelled."),
                _("unreachable since %(since)s") % {"since": _local(host.unreachable_since)},
            )
        return format_html('<span class="dcc-host-ok">{}</span>', _("healthy"))

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
                # An answer is as good as the reconcile pass's probe: an unhealthy host
                # takes jobs again now instead of at the next pass.
                back = health.record_success(host.pk)
                self.message_user(
                    request,
                    (
                        _("%(host)s: the Docker daemon at %(url)s answers; healthy again.")
                        if back
                        else _("%(host)s: the Docker daemon at %(url)s answers.")
                    )
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
