"""Where a job may run: each host's room (slots, memory, CPU), the host a job goes to, the
reservation that bounds a big job's wait, and why a job waits.

A host may declare a memory capacity (MiB) and a CPU capacity (cores). A job holding a
slot there then counts for its ``memory_limit`` and ``cpu_limit``, or for
``DEFAULT_JOB_MEMORY_MB`` / ``DEFAULT_JOB_CPUS`` when it sets none, and a job is admitted
only if what the host's jobs hold plus what it needs fits both capacities. A host that
declares neither counts jobs only, as before.

Admitting the first ready job that fits could starve a big job behind a stream of small
ones. So when the first ready job (by priority, then FIFO) fits no host now, it reserves
one: its pinned host, or else the largest active host it fits once free. No other job is
admitted there by queue order until it has started, so its wait is bounded by the jobs
already running on that host. Smaller jobs keep using the other hosts meanwhile.

The claim (``claims.py``) reads the rooms once, inside its lock, chooses with them, and
repeats every limit in its one conditional UPDATE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Count, F, FloatField, IntegerField, Q, Sum, Value
from django.db.models.functions import Coalesce

from . import states
from .conf import app_settings
from .models import ContainerJob, ExecutorHost

# Sums of float limits (0.1 + 0.2) must not refuse a job that fits exactly.
CPU_SLACK = 1e-6


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

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.used_slots) if self.active else 0

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

    def fits_empty(self, need: Need) -> bool:
        """Whether the job fits here at all, once the host's jobs have ended."""
        memory_ok = self.memory_mb is None or need.memory_mb <= self.memory_mb
        cpus_ok = self.cpus is None or need.cpus <= self.cpus + CPU_SLACK
        return self.active and memory_ok and cpus_ok

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
    """The first ready job fits no host now: no other job starts on ``host_id`` by queue
    order until it has."""

    host_id: int
    job_id: Any


def host_rooms() -> list[HostRoom]:
    """Every host's room, in one query (inactive hosts have no free slot)."""
    holding = Q(assigned_jobs__status__in=states.ACTIVE) | Q(assigned_jobs__stop_pending=True)
    default_memory = Value(app_settings.DEFAULT_JOB_MEMORY_MB, output_field=IntegerField())
    default_cpus = Value(float(app_settings.DEFAULT_JOB_CPUS), output_field=FloatField())
    rows = (
        ExecutorHost.objects.order_by("pk")
        .annotate(
            used_slots=Count("assigned_jobs", filter=holding),
            used_memory=Sum(
                Coalesce(F("assigned_jobs__memory_limit"), default_memory), filter=holding
            ),
            used_cpus=Sum(
                Coalesce(F("assigned_jobs__cpu_limit"), default_cpus),
                filter=holding,
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
        )
    )
    return [
        HostRoom(
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
        )
        for pk, name, active, weight, slots, used, memory, used_memory, cpus, used_cpus in rows
    ]


def choose_host(rooms: Sequence[HostRoom], need: Need, exclude: int | None = None) -> int | None:
    """The host for a job without one: among those it fits now, the most free slots
    weighted by the host's weight."""
    candidates = [r for r in rooms if r.host_id != exclude and r.fits_now(need)]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r.free_slots * r.weight, r.weight, -r.host_id))
    return best.host_id


def reservation_for(
    rooms: Sequence[HostRoom], head_id: Any, head_host: int | None, need: Need
) -> Reservation | None:
    """The reservation of the first ready job, when it fits no host now but fits one
    once free (see the module's docstring); None when it fits now or nowhere at all."""
    usable = [r for r in rooms if head_host is None or r.host_id == head_host]
    if any(r.fits_now(need) for r in usable):
        return None
    able = [r for r in usable if r.fits_empty(need)]
    if not able:
        return None
    largest = max(able, key=lambda r: (r.memory_mb or 0, r.cpus or 0.0, -r.host_id))
    return Reservation(largest.host_id, head_id)


def too_big(need: Need, pinned_host: int | None, rooms: Sequence[HostRoom]) -> tuple[str, str]:
    """(field, reason) when the job can never fit, or ("", "") when some active host it may
    use could hold it.

    A host that declares no capacity holds anything; a pinned host that is inactive may
    come back, so its jobs wait rather than fail.
    """
    usable = [r for r in rooms if r.active and (pinned_host is None or r.host_id == pinned_host)]
    if not usable or any(r.fits_empty(need) for r in usable):
        return "", ""
    where = "its host" if pinned_host is not None else "every active host"
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
    than every active host it may run on."""
    capacities = ExecutorHost.objects.filter(
        Q(memory_capacity_mb__isnull=False) | Q(cpu_capacity__isnull=False), is_active=True
    )
    if not capacities.exists():
        return  # the common case: no host counts resources, nothing more to read
    field, reason = too_big(Need.of_job(job), job.docker_host_id, host_rooms())
    if field:
        raise ValidationError({field: f"This job {reason}."})


def why_waiting(job: ContainerJob) -> list[str]:
    """Why a waiting job has not started, one line per cause (per host where it matters)."""
    if job.status not in states.WAITING:
        return [f"not waiting: the job is {job.status}"]
    lines = []
    if job.claimed_by:
        lines.append(f"claimed by {job.claimed_by}")
    if job.stop_pending:
        lines.append("a container of its previous attempt is still to be stopped")
    if job.scheduled_for is not None:
        from .models import database_now

        if job.scheduled_for > database_now():
            lines.append(f"scheduled for {job.scheduled_for.isoformat()}")
    limit = app_settings.MAX_CONCURRENT_JOBS
    holding = ContainerJob.objects.holding_slots().count()
    if holding >= limit:
        lines.append(f"global limit: {holding} of {limit} jobs hold a slot (MAX_CONCURRENT_JOBS)")
    rooms = host_rooms()
    need = Need.of_job(job)
    _field, reason = too_big(need, job.docker_host_id, rooms)
    if reason:
        lines.append(f"never fits: it {reason}")
    lines.extend(_host_lines(job, need, rooms))
    if not lines:
        lines.append("nothing holds it back: it starts with the next claim")
    return lines


def _host_lines(job: ContainerJob, need: Need, rooms: Sequence[HostRoom]) -> list[str]:
    pinned = job.docker_host_id
    reserved = _current_reservation(rooms)
    lines = []
    for room in rooms:
        if pinned is not None and room.host_id != pinned:
            continue
        reasons = _host_reasons(room, need, reserved, job.pk)
        if reasons:
            lines.append(f"host {room.name}: " + "; ".join(reasons))
    return lines


def _host_reasons(
    room: HostRoom, need: Need, reserved: Reservation | None, job_id: Any
) -> list[str]:
    if not room.active:
        return ["inactive"]
    reasons = []
    if room.free_slots <= 0:
        reasons.append(f"full: {room.used_slots} of {room.slots} slots taken")
    reasons.extend(room.shortfalls(need))
    if reserved is not None and reserved.host_id == room.host_id and reserved.job_id != job_id:
        reasons.append(f"reserved for job {reserved.job_id}, which comes first and is bigger")
    return reasons


def _current_reservation(rooms: Sequence[HostRoom]) -> Reservation | None:
    if not any(room.counts_resources for room in rooms):
        return None
    head = (
        ContainerJob.objects.ready()
        .filter(stop_pending=False)
        .values_list("pk", "docker_host_id", "memory_limit", "cpu_limit")[:1]
    )
    for pk, host, memory, cpus in head:
        return reservation_for(rooms, pk, host, Need.of(memory, cpus))
    return None


def _cores(value: float | None) -> str:
    return f"{value or 0:g}"
