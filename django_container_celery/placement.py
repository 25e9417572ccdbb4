"""Where a job may run: each host's room (slots, memory, CPU), the host a job goes to, the
reservation that bounds a big job's wait, and why a job waits.

A host may declare a memory capacity (MiB) and a CPU capacity (cores). A job holding a
slot there then counts for its ``memory_limit`` and ``cpu_limit``, or for
``DEFAULT_JOB_MEMORY_MB`` / ``DEFAULT_JOB_CPUS`` when it sets none, and a job is admitted
only if what the host's jobs hold plus what it needs fits both capacities. A host that
declares neither counts jobs only, as before.

Admitting the first ready job that fits could starve a big job behind a stream of small
ones. So the waiting jobs ahead of the first one that fits now (in queue order: priority,
then FIFO; among the first ``RESERVATION_SCAN``) each reserve a host they fit once it is
free: their pinned host, or else the largest active host they fit that no job ahead of
them holds. No other job is admitted on a reserved host by queue order until its job has
started, so that job waits only for the jobs already running there, as long as no job of
higher priority arrives to take its place in line. Jobs that no active host can hold
(pinned to a switched-off host) reserve nothing. Smaller jobs keep using the other hosts
meanwhile.

The claim (``claims.py``) reads the rooms once, inside its lock, chooses with them, and
repeats every limit in its one conditional UPDATE.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import (
    Count,
    F,
    FilteredRelation,
    FloatField,
    IntegerField,
    Q,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce

from . import states
from .conf import app_settings
from .lanes import LaneRoom, why_lane_waits
from .lanes import blocked as blocked_lanes
from .lanes import lane_rooms as lane_rooms_now
from .models import ContainerJob, ExecutorHost

# Sums of float limits (0.1 + 0.2) must not refuse a job that fits exactly.
CPU_SLACK = 1e-6
# How many waiting jobs, in queue order, a claim looks at for the one that reserves.
RESERVATION_SCAN = 50
# How the lines of why_waiting start where callers add to them.
GLOBAL_LIMIT = "global limit"
FITS_NOW = "it fits a host now"


@dataclasses.dataclass(frozen=True)
class Need:
    """What a job counts for on a host that declares capacity."""

    memory_mb: int
    cpus: float

    @classmethod
    def of(cls, memory_limit: int | None, cpu_limit: float | None) -> Need:
        memory = memory_limit if memory_limit is not None else app_settings.DEFAULT_JOB_MEMORY_MB
        cpus = cpu_limit if cpu_limit is not None else app_settings.DEFAULT_JOB_CPUS
        return cls(int(memory), float(cpus))

    @classmethod
    def of_job(cls, job: ContainerJob) -> Need:
        return cls.of(job.memory_limit, job.cpu_limit)


@dataclasses.dataclass(frozen=True)
class HostRoom:
    """One host's capacity and what the jobs holding its slots use of it."""

    host_id: int
    name: str
    active: bool
    weight: int
    slots: int
    used_slots: int
    memory_mb: int | None
    used_memory_mb: int
    cpus: float | None
    used_cpus: float
    unreachable_since: datetime | None = None
    unhealthy_since: datetime | None = None
    health_error: str = ""

    @property
    def healthy(self) -> bool:
        return self.unhealthy_since is None

    @property
    def free_slots(self) -> int:
        """Slots a new job may take now: none on a switched-off or unhealthy host."""
        if not (self.active and self.healthy):
            return 0
        return max(0, self.slots - self.used_slots)

    @property
    def free_memory_mb(self) -> int | None:
        return None if self.memory_mb is None else self.memory_mb - self.used_memory_mb

    @property
    def free_cpus(self) -> float | None:
        return None if self.cpus is None else self.cpus - self.used_cpus

    @property
    def counts_resources(self) -> bool:
        return self.memory_mb is not None or self.cpus is not None

    def fits_now(self, need: Need) -> bool:
        return self.free_slots > 0 and not self.shortfalls(need)

    def could_hold(self, need: Need) -> bool:
        """Whether the job fits this host's capacity at all, active or not."""
        memory_ok = self.memory_mb is None or need.memory_mb <= self.memory_mb
        cpus_ok = self.cpus is None or need.cpus <= self.cpus + CPU_SLACK
        return memory_ok and cpus_ok

    def fits_empty(self, need: Need) -> bool:
        """Whether the job fits here once the host's jobs have ended (an unhealthy host
        is not counted on: no job is held back waiting for it)."""
        return self.active and self.healthy and self.could_hold(need)

    def shortfalls(self, need: Need) -> list[str]:
        """What of this host's memory and CPU the job does not find free now."""
        missing = []
        free_memory, free_cpus = self.free_memory_mb, self.free_cpus
        if free_memory is not None and need.memory_mb > free_memory:
            missing.append(
                f"memory: {self.used_memory_mb} of {self.memory_mb} MiB in use, "
                f"the job needs {need.memory_mb} MiB"
            )
        if free_cpus is not None and need.cpus > free_cpus + CPU_SLACK:
            missing.append(
                f"CPU: {_cores(self.used_cpus)} of {_cores(self.cpus)} cores in use, "
                f"the job needs {_cores(need.cpus)}"
            )
        return missing


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Hosts held for waiting jobs that fit no host now (host id → job id): no other job
    starts on them by queue order until their job has."""

    hosts: Mapping[int, Any]

    def holds(self, host_id: int) -> bool:
        return host_id in self.hosts


def host_rooms() -> list[HostRoom]:
    """Every host's room, in one query (inactive hosts have no free slot)."""
    # The join is limited to the slot-holding jobs (FilteredRelation puts the condition
    # in its ON clause), so the partial index on them serves it; an aggregate FILTER
    # instead would join every job each host ever ran, on every claim.
    holding = Q(assigned_jobs__status__in=states.ACTIVE) | Q(assigned_jobs__stop_pending=True)
    default_memory = Value(app_settings.DEFAULT_JOB_MEMORY_MB, output_field=IntegerField())
    default_cpus = Value(float(app_settings.DEFAULT_JOB_CPUS), output_field=FloatField())
    joined = Q(holding__id__isnull=False)
    rows = (
        ExecutorHost.objects.order_by("pk")
        .annotate(holding=FilteredRelation("assigned_jobs", condition=holding))
        .annotate(
            used_slots=Count("holding"),
            # A host holding nothing still has its one outer-joined row of NULLs, which
            # the defaults must not count as a job.
            used_memory=Sum(Coalesce(F("holding__memory_limit"), default_memory), filter=joined),
            used_cpus=Sum(
                Coalesce(F("holding__cpu_limit"), default_cpus),
                filter=joined,
                output_field=FloatField(),
            ),
        )
        .values_list(
            "id",
            "name",
            "is_active",
            "weight",
            "max_concurrent_jobs",
            "used_slots",
            "memory_capacity_mb",
            "used_memory",
            "cpu_capacity",
            "used_cpus",
            "unreachable_since",
            "unhealthy_since",
            "health_error",
        )
    )
    return [_room(*row) for row in rows]


def _room(
    pk: int,
    name: str,
    active: bool,
    weight: int,
    slots: int,
    used: int,
    memory: int | None,
    used_memory: int | None,
    cpus: float | None,
    used_cpus: float | None,
    unreachable: datetime | None,
    unhealthy: datetime | None,
    health_error: str,
) -> HostRoom:
    return HostRoom(
        host_id=pk,
        name=name,
        active=active,
        weight=weight,
        slots=slots,
        used_slots=used,
        memory_mb=memory,
        used_memory_mb=int(used_memory or 0),
        cpus=cpus,
        used_cpus=float(used_cpus or 0.0),
        unreachable_since=unreachable,
        unhealthy_since=unhealthy,
        health_error=health_error,
    )


def capacity_rooms() -> list[HostRoom]:
    """Every host's capacity with nothing in use: enough to tell whether a job could ever
    fit, without reading the jobs."""
    rows = ExecutorHost.objects.order_by("pk").values_list(
        "id",
        "name",
        "is_active",
        "weight",
        "max_concurrent_jobs",
        "memory_capacity_mb",
        "cpu_capacity",
    )
    return [
        HostRoom(pk, name, active, weight, slots, 0, memory, 0, cpus, 0.0)
        for pk, name, active, weight, slots, memory, cpus in rows
    ]


def taken(room: HostRoom, need: Need) -> HostRoom:
    """The room left on a host once a job of this need holds one of its slots."""
    return dataclasses.replace(
        room,
        used_slots=room.used_slots + 1,
        used_memory_mb=room.used_memory_mb + need.memory_mb,
        used_cpus=room.used_cpus + need.cpus,
    )


def choose_host(rooms: Sequence[HostRoom], need: Need, exclude: Collection[int] = ()) -> int | None:
    """The host for a job without one: among those it fits now, the most free slots
    weighted by the host's weight."""
    candidates = [r for r in rooms if r.host_id not in exclude and r.fits_now(need)]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r.free_slots * r.weight, r.weight, -r.host_id))
    return best.host_id


def find_reservation(
    rooms: Sequence[HostRoom], waiting: Iterable[tuple[Any, int | None, Need]]
) -> Reservation | None:
    """The hosts reserved by ``waiting`` (job id, pinned host, need), in queue order: see
    the module's docstring. None when nothing is reserved."""
    held: dict[int, Any] = {}
    for job_id, pinned, need in waiting:
        usable = [
            r for r in rooms if r.host_id not in held and (pinned is None or r.host_id == pinned)
        ]
        if any(r.fits_now(need) for r in usable):
            break  # the claim takes this one; nobody behind it needs protecting from it
        able = [r for r in usable if r.fits_empty(need)]
        if able:
            held[max(able, key=_size).host_id] = job_id
    return Reservation(held) if held else None


def _size(room: HostRoom) -> tuple[float, float, int]:
    # A host that does not count a resource holds any amount of it.
    memory = math.inf if room.memory_mb is None else room.memory_mb
    cpus = math.inf if room.cpus is None else room.cpus
    return memory, cpus, -room.host_id


def too_big(need: Need, pinned_host: int | None, rooms: Sequence[HostRoom]) -> tuple[str, str]:
    """(field, reason) when no host the job may use could ever hold it, or ("", "").

    Switched-off hosts count: a host taken out for maintenance comes back, and the jobs
    only it can hold wait for it rather than fail. A host that declares no capacity holds
    anything.
    """
    usable = [r for r in rooms if pinned_host is None or r.host_id == pinned_host]
    if not usable or any(r.could_hold(need) for r in usable):
        return "", ""
    where = "its host" if pinned_host is not None else "every host"
    if any(r.memory_mb is not None and need.memory_mb > r.memory_mb for r in usable):
        largest = max(r.memory_mb or 0 for r in usable)
        return "memory_limit", (
            f"needs {need.memory_mb} MiB of memory, more than {where} can hold "
            f"(largest: {largest} MiB)"
        )
    largest_cpus = max(r.cpus or 0.0 for r in usable)
    return "cpu_limit", (
        f"needs {_cores(need.cpus)} CPU cores, more than {where} can hold "
        f"(largest: {_cores(largest_cpus)})"
    )


def validate_fits_some_host(job: ContainerJob) -> None:
    """ValidationError naming ``memory_limit`` or ``cpu_limit`` when the job is bigger
    than every host it may run on."""
    field, reason = too_big(Need.of_job(job), job.docker_host_id, capacity_rooms())
    if field:
        raise ValidationError({field: f"This job {reason}."})


def why_waiting(job: ContainerJob) -> list[str]:
    """Why a waiting job has not started, one line per cause (per host where it matters)."""
    if job.status not in states.WAITING:
        return [f"not waiting: the job is {job.status}"]
    lines = [*_job_lines(job), *why_lane_waits(job)]
    limit = app_settings.MAX_CONCURRENT_JOBS
    holding = ContainerJob.objects.holding_slots().count()
    if holding >= limit:
        lines.append(f"{GLOBAL_LIMIT}: {holding} of {limit} jobs hold a slot (MAX_CONCURRENT_JOBS)")
    rooms = host_rooms()
    need = Need.of_job(job)
    _field, reason = too_big(need, job.docker_host_id, rooms)
    if reason:
        lines.append(f"never fits: it {reason}")
    usable = [r for r in rooms if job.docker_host_id is None or r.host_id == job.docker_host_id]
    reserved = _current_reservation(rooms)
    hosts = {room.name: _host_reasons(room, need, reserved, job.pk) for room in usable}
    if rooms and not any(not reasons for reasons in hosts.values()):
        lines.extend(f"host {name}: " + "; ".join(reasons) for name, reasons in hosts.items())
    if not lines:
        lines.append(
            f"{FITS_NOW}: it starts with the next claim, after the jobs ahead of it "
            "in the queue (higher priority, or the same priority and queued earlier)"
        )
    return lines


def _job_lines(job: ContainerJob) -> list[str]:
    lines = []
    if job.claimed_by:
        lines.append(f"claimed by {job.claimed_by}")
    if job.stop_pending:
        lines.append("a container of its previous attempt is still to be stopped")
    if job.scheduled_for is not None:
        from .models import database_now

        if job.scheduled_for > database_now():
            lines.append(f"scheduled for {job.scheduled_for.isoformat()}")
    return lines


def _host_reasons(
    room: HostRoom, need: Need, reserved: Reservation | None, job_id: Any
) -> list[str]:
    if not room.active:
        return ["inactive"]
    reasons = []
    if not room.healthy:
        since = room.unhealthy_since.isoformat() if room.unhealthy_since else "?"
        reasons.append(f"unhealthy since {since}: {room.health_error}")
    elif room.unreachable_since is not None:
        reasons.append(f"its daemon has not answered since {room.unreachable_since.isoformat()}")
    if room.used_slots >= room.slots:
        reasons.append(f"full: {room.used_slots} of {room.slots} slots taken")
    reasons.extend(room.shortfalls(need))
    holder = reserved.hosts.get(room.host_id) if reserved is not None else None
    if holder is not None and holder != job_id:
        reasons.append(
            f"reserved for job {holder}, which comes first in the queue and fits no host now"
        )
    return reasons


def _current_reservation(rooms: Sequence[HostRoom]) -> Reservation | None:
    if not any(room.counts_resources for room in rooms):
        return None
    lane_rooms = lane_rooms_now()
    waiting = (
        ContainerJob.objects.ready()
        .filter(stop_pending=False)
        .exclude(lane__in=blocked_lanes(lane_rooms))
        .values_list("pk", "docker_host_id", "memory_limit", "cpu_limit", "lane")[:RESERVATION_SCAN]
    )
    return find_reservation(rooms, within_lane_room(waiting, lane_rooms))


def within_lane_room(
    waiting: Iterable[tuple[Any, ...]], lane_rooms: Sequence[LaneRoom]
) -> Iterator[tuple[Any, int | None, Need]]:
    """(job id, pinned host, need) of waiting rows (id, host, memory, cpus, lane), in queue
    order, leaving out the jobs a limited lane has no place for once its earlier jobs took
    its free places: two jobs of a lane with one place must not reserve two hosts."""
    free = {room.name: room.free for room in lane_rooms if room.free is not None}
    for job_id, pinned, memory, cpus, lane in waiting:
        if lane in free:
            if free[lane] <= 0:
                continue
            free[lane] -= 1
        yield job_id, pinned, Need.of(memory, cpus)


def _cores(value: float | None) -> str:
    return f"{value or 0:g}"
