"""Lanes: pause and resume, and the room each lane leaves for claims.

A lane is a named share of the queue (``models.Lane``). Its limit and its pause are held
by the claim itself (``claims.py``), under the same lock and in the same conditional
UPDATE as the global and host limits, so racing workers never exceed a lane's limit and
never start a job of a paused lane. Jobs whose lane has no row, and jobs with no lane,
are limited by nothing here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from django.db.models import Count, Q

from . import states
from .models import ContainerJob, Lane, database_now


@dataclasses.dataclass(frozen=True)
class LaneRoom:
    """A lane that may hold jobs back: paused, or limited (with what it holds now)."""

    name: str
    paused: bool
    limit: int | None
    holding: int

    @property
    def free(self) -> int | None:
        """Jobs it may still start now; None: no lane limit."""
        if self.paused:
            return 0
        if self.limit is None:
            return None
        return max(0, self.limit - self.holding)


def lane_rooms() -> list[LaneRoom]:
    """Every paused or limited lane with its slot-holding jobs, in two small queries."""
    lanes = list(
        Lane.objects.filter(Q(is_paused=True) | Q(max_concurrent_jobs__isnull=False))
        .order_by("name")
        .values_list("name", "is_paused", "max_concurrent_jobs")
    )
    if not lanes:
        return []
    limited = [name for name, _paused, limit in lanes if limit is not None]
    counts: dict[str, int] = {}
    if limited:
        holding = (
            ContainerJob.objects.holding_slots()
            .filter(lane__in=limited)
            .values("lane")
            .annotate(n=Count("pk"))
        )
        counts = {row["lane"]: int(row["n"]) for row in holding}
    return [LaneRoom(name, paused, limit, counts.get(name, 0)) for name, paused, limit in lanes]


def lane_counts(names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(jobs holding a slot, jobs waiting) per lane, for these lanes in one query: what
    the admin's lane list and ``container_lanes list`` show."""
    if not names:
        return {}
    holding = Q(status__in=sorted(states.ACTIVE)) | Q(stop_pending=True)
    waiting = Q(status__in=sorted(states.WAITING))
    rows = (
        ContainerJob.objects.filter(lane__in=list(names))
        .filter(holding | waiting)
        .order_by()
        .values("lane")
        .annotate(holding=Count("pk", filter=holding), waiting=Count("pk", filter=waiting))
    )
    return {row["lane"]: (int(row["holding"]), int(row["waiting"])) for row in rows}


def blocked(rooms: Iterable[LaneRoom]) -> list[str]:
    """Lanes whose jobs may not start now: paused, or at their limit."""
    return [room.name for room in rooms if room.free == 0]


def pause(names: Sequence[str], by: str = "") -> int:
    """Pause these lanes: none of their jobs starts until resumed. Returns how many lanes
    changed. Running jobs are left to finish; waiting jobs keep their place."""
    return Lane.objects.filter(name__in=list(names), is_paused=False).update(
        is_paused=True, paused_at=database_now(), paused_by=by[:150]
    )


def resume(names: Sequence[str]) -> int:
    """Resume these lanes; returns how many changed. Their waiting jobs are offered to the
    next dispatch at once (a message used while the lane was paused is not waited for)."""
    changed = Lane.objects.filter(name__in=list(names), is_paused=True).update(
        is_paused=False, paused_at=None, paused_by=""
    )
    if changed:
        ContainerJob.objects.filter(
            lane__in=list(names), status__in=states.WAITING, claimed_by=""
        ).update(dispatched_at=None)
    return changed


def why_lane_waits(job: ContainerJob) -> list[str]:
    """Lines for ``placement.why_waiting``: the job's lane is paused or full."""
    if not job.lane:
        return []
    lane = Lane.objects.filter(name=job.lane).first()
    if lane is None:
        return []
    lines = []
    if lane.is_paused:
        since = lane.paused_at.isoformat() if lane.paused_at else "?"
        who = f" by {lane.paused_by}" if lane.paused_by else ""
        lines.append(f"lane {lane.name} is paused (since {since}{who})")
    if lane.max_concurrent_jobs is not None:
        holding = lane.holding_count()
        if holding >= lane.max_concurrent_jobs:
            lines.append(
                f"lane {lane.name}: {holding} of {lane.max_concurrent_jobs} jobs hold a slot"
            )
    return lines
