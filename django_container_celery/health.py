"""Where a host's health is kept: failed calls to its daemon counted in a row, the host
marked unhealthy past ``HOST_FAILURES_BEFORE_UNHEALTHY``, healthy again at the first call
that succeeds.

An unhealthy host has no free slot (``placement``): jobs without a pinned host go to the
healthy hosts, jobs pinned to it wait for it. Its running jobs are left alone, since they
may still run there. The probe that brings it back is the reconcile pass: the watcher
leading the host lists its containers every ``RECONCILE_INTERVAL`` seconds (without
watchers, beat's ``rescue_stale_jobs`` does at its own interval) and records the answer
here; a launch that reaches the daemon counts as well.

Only a call the daemon did not answer counts (a refused connection, a missing socket, a
timeout): an error the daemon answered with (a missing image, a bad request) says nothing
about the host. Each record is one conditional UPDATE, so launchers and watchers on
several machines count together without reading the row first.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import docker.errors
import requests.exceptions
import urllib3.exceptions
from django.db.models import Case, F, Q, When
from django.db.models.functions import Coalesce, Now

from .conf import app_settings
from .exceptions import ExecutorError
from .models import ExecutorHost

logger = logging.getLogger(__name__)

# The longest error kept on the host row: the head says what failed.
ERROR_CHARS = 500

_NO_ANSWER = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    FileNotFoundError,
    socket.timeout,
    TimeoutError,
)


def daemon_did_not_answer(error: BaseException) -> bool:
    """Whether a failed call never got an answer from the daemon (the host's fault),
    rather than an answer refusing it (the job's or the request's)."""
    seen: set[int] = set()
    current: BaseException | None = error
    found = False
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        if isinstance(current, docker.errors.APIError):
            return False  # the daemon answered
        if isinstance(current, _NO_ANSWER):
            found = True
        wrapped = getattr(current, "original", None) if isinstance(current, ExecutorError) else None
        current = wrapped or current.__cause__ or current.__context__
    return found


def record_failure(host_id: Any, error: BaseException | str) -> None:
    """Count one failed call to the host's daemon; the one that reaches the threshold
    marks the host unhealthy, by the database's clock."""
    if host_id is None:
        return  # the default Docker host has no row to mark
    threshold = int(app_settings.HOST_FAILURES_BEFORE_UNHEALTHY)
    text = str(error)[:ERROR_CHARS] or type(error).__name__
    ExecutorHost.objects.filter(pk=host_id).update(
        failures_in_row=F("failures_in_row") + 1,
        health_error=text,
        unreachable_since=Coalesce(F("unreachable_since"), Now()),
        unhealthy_since=Case(
            When(
                Q(unhealthy_since__isnull=True) & Q(failures_in_row__gte=threshold - 1),
                then=Now(),
            ),
            default=F("unhealthy_since"),
        ),
    )


def record_success(host_id: Any) -> bool:
    """A call to the host's daemon succeeded: clear its failures (a read, and a
    conditional UPDATE only when there is something to clear). True when there was."""
    if host_id is None:
        return False
    failing = ExecutorHost.objects.filter(pk=host_id).filter(
        Q(failures_in_row__gt=0)
        | Q(unhealthy_since__isnull=False)
        | Q(unreachable_since__isnull=False)
    )
    # Read first: on SQLite even an UPDATE that matches nothing takes the write lock, and
    # a healthy host is the common case of every launch.
    if not failing.exists():
        return False
    cleared = failing.update(
        failures_in_row=0, unhealthy_since=None, unreachable_since=None, health_error=""
    )
    if cleared:
        logger.info("host %s answers again", host_id)
    return bool(cleared)


def record(host_id: Any, error: BaseException | None) -> None:
    """Record a call's result: ``error`` None for a success."""
    if error is None:
        record_success(host_id)
    elif daemon_did_not_answer(error):
        record_failure(host_id, error)


def describe(host: ExecutorHost) -> str:
    """``healthy``, ``failing (2 calls in a row): …`` or ``unhealthy since …: …``."""
    if host.unhealthy_since is not None:
        return f"unhealthy since {host.unhealthy_since.isoformat()}: {host.health_error}"
    if host.failures_in_row:
        return f"failing ({host.failures_in_row} calls in a row): {host.health_error}"
    return "healthy"
