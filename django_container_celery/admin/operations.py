"""What the admin does to jobs, kept apart from how the admin shows them.

The bulk actions and the per-row buttons share one set of operations, so a job is queued,
dequeued, cancelled or retried the same way from both, and both report skipped jobs with
the same reasons. Every status change goes through ``queue_manager`` or the model's own
methods; nothing here assigns ``status`` and saves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from datetime import datetime

from django.contrib import messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .. import states
from ..models import ContainerJob
from ..queue import queue_manager
from ..states import Status
from .forms import EDITABLE_STATUSES, LOCKED_STATUSES

_WAITING = sorted(states.WAITING)


def job_label(job: ContainerJob) -> str:
    return job.name or f"{str(job.pk)[:8]} ({job.docker_image})"


# -- reporting ---------------------------------------------------------------------------


@dataclasses.dataclass
class ActionReport:
    """How many jobs an operation changed, and which it skipped and why."""

    verb: str | Promise
    changed: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def record(self, job: ContainerJob, reason: str | None) -> None:
        if reason is None:
            self.changed += 1
        else:
            self.skipped.setdefault(reason, []).append(job_label(job))

    def skip_count(self) -> int:
        return sum(len(names) for names in self.skipped.values())

    def summary(self) -> str:
        return ngettext("%(verb)s %(count)d job.", "%(verb)s %(count)d jobs.", self.changed) % {
            "verb": self.verb,
            "count": self.changed,
        }

    def skipped_text(self) -> str:
        parts = []
        for reason, names in self.skipped.items():
            shown = ", ".join(names[:5])
            if len(names) > 5:
                shown += f" and {len(names) - 5} more"
            parts.append(f"{reason} ({shown})")
        count = self.skip_count()
        head = ngettext("Skipped %(count)d job", "Skipped %(count)d jobs", count) % {"count": count}
        return f"{head}: {'; '.join(parts)}."

    def send(self, request: HttpRequest) -> None:
        level = messages.SUCCESS if self.changed else messages.WARNING
        messages.add_message(request, level, self.summary())
        if self.skipped:
            messages.add_message(request, messages.WARNING, self.skipped_text())


# -- operations on one job ---------------------------------------------------------------

Outcome = str | None  # None: the job changed; otherwise why it was skipped


def _status_reason(status: str) -> str:
    reasons: dict[str, str] = {
        Status.PENDING: "not queued",
        Status.QUEUED: "already queued",
        Status.RETRYING: "already waiting for a retry",
        Status.LAUNCHING: "already launching",
        Status.RUNNING: "already running",
        Status.COMPLETED: "already completed",
        Status.FAILED: "failed (use Retry failed)",
        Status.CANCELLED: "cancelled",
    }
    return reasons.get(status, f"status is {status}")


def _guarded(job: ContainerJob, operation: Callable[[], object]) -> Outcome:
    """Run ``operation``; a job that moved under us is skipped with its new status."""
    try:
        operation()
    except ValueError:
        # InvalidTransition and TransitionConflict are ValueErrors: the row changed since
        # it was read, so report what it is now rather than what we expected.
        job.refresh_from_db(fields=["status"])
        return f"changed meanwhile, now {job.status}"
    return None


def queue_one(job: ContainerJob) -> Outcome:
    if job.status != Status.PENDING:
        return _status_reason(job.status)
    return _guarded(job, lambda: queue_manager.queue_job(job))


def dequeue_one(job: ContainerJob) -> Outcome:
    if job.status not in states.WAITING:
        return (
            "not waiting in the queue"
            if job.status == Status.PENDING
            else (_status_reason(job.status))
        )
    return _guarded(job, lambda: queue_manager.dequeue_job(job))


def cancel_one(job: ContainerJob) -> Outcome:
    if job.status not in states.CANCELLABLE:
        return "already failed" if job.status == Status.FAILED else _status_reason(job.status)
    if queue_manager.cancel_job(job):
        return None
    job.refresh_from_db(fields=["status"])
    return f"changed meanwhile, now {job.status}"


def retry_one(job: ContainerJob, reset_count: bool = False) -> Outcome:
    if job.status != Status.FAILED:
        return f"not failed ({job.status})"
    return _guarded(job, lambda: queue_manager.retry_failed_job(job, reset_count=reset_count))


def schedule_one(job: ContainerJob, when: datetime) -> Outcome:
    """Make the job due at ``when``: queue a pending job, move a waiting one's time."""
    if job.status == Status.PENDING:
        return _guarded(job, lambda: queue_manager.queue_job(job, schedule_for=when))
    if job.status in states.WAITING:
        # Not a status change: only the due time moves, and only while no worker holds
        # the job, so a claim that won the race is never undone. dispatched_at is cleared
        # so that dispatch sends a fresh message when the new time comes.
        moved = ContainerJob.objects.filter(pk=job.pk, status__in=_WAITING, claimed_by="").update(
            scheduled_for=when, dispatched_at=None, updated_at=timezone.now()
        )
        if moved:
            job.scheduled_for = when
            return None
        job.refresh_from_db(fields=["status"])
        return f"changed meanwhile, now {job.status}"
    return _status_reason(job.status)


@dataclasses.dataclass(frozen=True)
class JobOperation:
    """One operation offered both as a bulk action and as a button on a row."""

    name: str
    label: str | Promise
    verb: str | Promise
    # The custom permission needed besides change: "queue" or "cancel".
    permission: str
    # Statuses in which the button is offered.
    statuses: frozenset[str]
    run: Callable[[ContainerJob], Outcome]


OPERATIONS: dict[str, JobOperation] = {
    op.name: op
    for op in (
        JobOperation(
            "queue",
            _("Queue"),
            _("Queued"),
            "queue",
            frozenset({Status.PENDING}),
            queue_one,
        ),
        JobOperation(
            "dequeue",
            _("Dequeue"),
            _("Dequeued"),
            "queue",
            states.WAITING,
            dequeue_one,
        ),
        JobOperation(
            "cancel",
            _("Cancel"),
            _("Cancelled"),
            "cancel",
            states.CANCELLABLE,
            cancel_one,
        ),
        JobOperation(
            "retry",
            _("Retry"),
            _("Queued again"),
            "queue",
            frozenset({Status.FAILED}),
            retry_one,
        ),
    )
}


def run_operation(
    jobs: Iterable[ContainerJob], verb: str | Promise, operation: Callable[[ContainerJob], Outcome]
) -> ActionReport:
    report = ActionReport(verb)
    for job in jobs:
        report.record(job, operation(job))
    return report


def set_priority(queryset: QuerySet[ContainerJob], value: int, verb: str | Promise) -> ActionReport:
    """Set the priority of every selected job that has not started, in one UPDATE."""
    report = ActionReport(verb)
    jobs = list(
        queryset.select_related(None).only("pk", "name", "docker_image", "status", "priority")
    )
    eligible = []
    for job in jobs:
        if job.status in LOCKED_STATUSES:
            report.record(job, _status_reason(job.status))
        elif job.priority == value:
            report.record(job, f"priority is already {value}")
        else:
            eligible.append(job)
    # Conditional on status so that a job claimed since the list was read keeps the
    # priority it was launched with.
    updated = ContainerJob.objects.filter(
        pk__in=[job.pk for job in eligible], status__in=sorted(EDITABLE_STATUSES)
    ).update(priority=value, updated_at=timezone.now())
    if updated == len(eligible):
        report.changed += updated
    else:
        now_set = set(
            ContainerJob.objects.filter(
                pk__in=[job.pk for job in eligible], priority=value
            ).values_list("pk", flat=True)
        )
        for job in eligible:
            report.record(job, None if job.pk in now_set else "started meanwhile")
    return report
