"""What the dashboard and the host list read: load per host, figures of the queue."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from .. import placement
from ..hosts import cpu_use, memory_use
from ..models import ContainerJob, ExecutorHost, Lane
from ..queue import queue_manager
from ..states import Status
from .filters import NEEDS_ATTENTION_Q

# The dashboard names this many paused lanes; the lane list has them all.
PAUSED_LANES_SHOWN = 10


def with_load(hosts: QuerySet[ExecutorHost]) -> QuerySet[ExecutorHost]:
    """Annotate ``active_jobs``: jobs launching or running on each host.

    A correlated subquery rather than ``Count`` over the join: the join would read every
    job a host ever ran, while the subquery is served by the partial index on active jobs.
    """
    active = (
        ContainerJob.objects.holding_slots()
        .filter(assigned_host=OuterRef("pk"))
        .order_by()
        .values("assigned_host")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return hosts.annotate(active_jobs=Coalesce(Subquery(active, output_field=IntegerField()), 0))


def _resource_use(room: placement.HostRoom | None) -> dict[str, Any]:
    """The dashboard's memory and CPU cells of one host, and which of them is used up."""
    if room is None:  # created after the rooms were read
        return {"memory": "-", "cpu": "-", "memory_full": False, "cpu_full": False}
    free_memory, free_cpus = room.free_memory_mb, room.free_cpus
    return {
        "memory": memory_use(room),
        "cpu": cpu_use(room),
        "memory_full": free_memory is not None and free_memory <= 0,
        "cpu_full": free_cpus is not None and free_cpus <= placement.CPU_SLACK,
    }


def dashboard_data(now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, in a fixed number of queries; the job counts are
    answered from indexes (see ``get_queue_stats``), not by reading every job kept."""
    now = now or timezone.now()
    # Read once, for the queue's figures and the host rows alike: a host's running jobs
    # are its used slots (active, or ended with the container still to stop).
    rooms = placement.host_rooms()
    stats = queue_manager.get_queue_stats(rooms=rooms)
    by_host = {room.host_id: room for room in rooms}
    hosts = []
    on_hosts = 0
    for host in ExecutorHost.objects.all():
        room = by_host.get(host.pk)
        running = room.used_slots if room is not None else 0
        on_hosts += running
        capacity = host.max_concurrent_jobs
        hosts.append(
            {
                "host": host,
                "running": running,
                "capacity": capacity,
                "percent": min(100, round(100 * running / capacity)) if capacity else 0,
                "full": running >= capacity,
                **_resource_use(room),
            }
        )
    failed_last_hour = ContainerJob.objects.filter(
        status=Status.FAILED, completed_at__gte=now - timedelta(hours=1)
    ).count()
    oldest = (
        ContainerJob.objects.waiting()
        .filter(queued_at__isnull=False)
        .order_by("queued_at")
        .only("pk", "name", "docker_image", "queued_at", "scheduled_for", "status", "priority")
        .first()
    )
    paused = list(
        Lane.objects.filter(is_paused=True)
        .order_by("paused_at", "name")
        .only("pk", "name", "paused_at", "paused_by")[: PAUSED_LANES_SHOWN + 1]
    )
    return {
        "stats": stats,
        "hosts": hosts,
        # Jobs with no ExecutorHost run on the default Docker host from settings.
        "default_host_running": max(0, int(stats["running"]) - on_hosts),
        "failed_last_hour": failed_last_hour,
        "oldest": oldest,
        "oldest_waiting_for": (now - oldest.queued_at) if oldest and oldest.queued_at else None,
        "now": now,
        "needs_attention": ContainerJob.objects.filter(NEEDS_ATTENTION_Q).count(),
        "paused_lanes": paused[:PAUSED_LANES_SHOWN],
        "more_paused_lanes": len(paused) > PAUSED_LANES_SHOWN,
    }
