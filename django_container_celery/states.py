"""The job status set and the transition table: the only edges a job may take.

::

    pending ──► queued ──► launching ──► running ──► completed
       │          │  ▲         │  │         │
       │          │  └─────────┘  │         ├──► failed ──► queued (manual retry)
       │          │   (released)  │         │
       │          ▼               ▼         ▼
       │       pending        retrying ◄────┘ (retryable exit code, vanished container)
       │     (dequeue)          │  │
       │                        │  └──► launching (back-off elapsed)
       ▼                        ▼
    cancelled ◄── from every non-final status

    queued, retrying ──► failed   (refused: bigger than every host it may run on)

``launching`` is the short span in which a worker holds the claim but the container is
not running yet; it counts against concurrency limits like ``running``.
"""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    PENDING = "pending", _("Pending")
    QUEUED = "queued", _("Queued")
    LAUNCHING = "launching", _("Launching")
    RUNNING = "running", _("Running")
    RETRYING = "retrying", _("Retrying")
    COMPLETED = "completed", _("Completed")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


VALID_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.PENDING: frozenset({Status.QUEUED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.LAUNCHING, Status.PENDING, Status.CANCELLED, Status.FAILED}),
    Status.RETRYING: frozenset({Status.LAUNCHING, Status.PENDING, Status.CANCELLED, Status.FAILED}),
    Status.LAUNCHING: frozenset(
        {Status.RUNNING, Status.RETRYING, Status.FAILED, Status.QUEUED, Status.CANCELLED}
    ),
    Status.RUNNING: frozenset({Status.COMPLETED, Status.FAILED, Status.RETRYING, Status.CANCELLED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.COMPLETED: frozenset(),
    Status.CANCELLED: frozenset(),
}

# Waiting in the queue: eligible for a claim once due.
WAITING = frozenset({Status.QUEUED, Status.RETRYING})
# Holding a slot: counted against max_concurrent and per-host capacity.
ACTIVE = frozenset({Status.LAUNCHING, Status.RUNNING})
# Nothing more will happen to the job unless a person acts.
FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
TERMINAL = frozenset({Status.COMPLETED, Status.CANCELLED})
CANCELLABLE = frozenset(
    {Status.PENDING, Status.QUEUED, Status.RETRYING, Status.LAUNCHING, Status.RUNNING}
)


def can_transition(old: str, new: str) -> bool:
    return new in VALID_TRANSITIONS.get(old, frozenset())


def sources_of(new: str) -> frozenset[str]:
    """Every status from which ``new`` may be reached."""
    return frozenset(old for old, targets in VALID_TRANSITIONS.items() if new in targets)
