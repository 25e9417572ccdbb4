"""Where an attempt ends: the one function, :func:`end_attempt`, that records how it ended
and decides the job's next status.

Every path that sees an attempt end describes it as an :class:`~.outcomes.Ending` (an
exit, a timeout, a vanished container, a failed launch, a cancel, a job that cannot be
finished) and calls :func:`end_attempt`; the retry decision is
``retry.get_retry_decision``. The write is conditional on the claim (owner and attempt),
so a process whose claim moved on records nothing. An attempt under way gets its history
row (``JobAttempt``: how it ended, where, when) in the same transaction as the job's
transition, so the row exists exactly when the transition was made.

The database row is written first and the container removed second: a worker that dies
in between leaves an exited container (found later by cleanup), never a job that a rescue
would run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from django.db import DatabaseError, transaction

from . import states
from .conf import app_settings
from .exceptions import ExecutorError, TransitionConflict
from .executors.base import Executor
from .masking import mask_text, masked_exception
from .models import ContainerJob, JobAttempt, database_now
from .outcomes import End, Ending
from .retry import get_retry_decision, launch_error_type
from .signals import attempt_ended
from .states import Status

logger = logging.getLogger(__name__)

Remover = Callable[[Executor, str], None]


def end_attempt(
    job: ContainerJob,
    ending: Ending,
    *,
    executor: Executor | None = None,
    remove: Remover | None = None,
    as_claimant: bool = True,
    **fields: Any,
) -> bool:
    """Record the end of the job's current attempt; False if the claim moved on.

    With an ``executor``, an exited or killed container's logs are stored and, unless
    ``KEEP_CONTAINERS``, the container is removed afterwards (``remove`` replaces the
    inline removal: the watcher queues it, so a slow removal never delays the next exit).
    """
    if executor is not None and ending.container_exited:
        fields["stdout_log"], fields["stderr_log"] = _read_logs(executor, job.container_name)
    if ending.container_exited:
        fields.setdefault("exit_code", ending.exit_code)
    try:
        _record(job, ending, as_claimant, fields)
    except TransitionConflict:
        logger.info("job %s: attempt %s not ended here, its claim moved on", job.pk, job.attempt)
        return False
    announce(job)
    if executor is not None and ending.container_exited and not app_settings.KEEP_CONTAINERS:
        (remove or remove_container)(executor, job.container_name)
    return True


def _record(job: ContainerJob, ending: Ending, as_claimant: bool, fields: dict[str, Any]) -> None:
    """Write the job's transition and, when an attempt was under way, its history row, in
    one transaction: when the transition raises (TransitionConflict), neither is written.

    The history row goes first, in its own savepoint: a failure to write it is logged
    and the job still ends.
    """
    with transaction.atomic():
        ended = _attempt_in_progress(job)
        if ended is not None and ending.without_outcome:
            # Counted from the locked row: the decision below reads it on the instance.
            job.attempts_without_outcome = ended["attempts_without_outcome"] + 1
            fields["attempts_without_outcome"] = job.attempts_without_outcome
        if ended is not None and ending.kind is End.OUT_OF_MEMORY:
            # The limit the attempt ran with, from the locked row: the decision raises it
            # and the message names it.
            job.memory_limit = ended["memory_limit"]
        if ending.kind is End.EXITED and ending.exit_code == 0 and not ending.error:
            _write_attempt(ended, job, ending, fields, error="", retried=False)
            job.mark_as_completed(as_claimant=as_claimant, **fields)
            return
        if ending.kind is End.CANCELLED:
            _write_attempt(ended, job, ending, fields, error="", retried=False)
            job.transition_to(Status.CANCELLED, as_claimant=as_claimant, **_cancel_fields(fields))
            return
        decision = get_retry_decision(job, ending)
        message = describe(job, ending)
        if decision.reason:
            message += f" ({decision.reason})"
        _write_attempt(ended, job, ending, fields, error=message, retried=decision.retry)
        if decision.retry:
            # The decision's changes (a raised memory_limit) go in the same conditional
            # transition: a retry is never scheduled without them, nor they without it.
            changed = {**fields, **decision.changes}
            job.mark_as_retrying(decision.delay, error=message, as_claimant=as_claimant, **changed)
        else:
            if decision.needs_attention:
                fields["needs_attention"] = True
            job.mark_as_failed(error=message, as_claimant=as_claimant, **fields)


def _attempt_in_progress(job: ContainerJob) -> Mapping[str, Any] | None:
    """The row's current attempt (number, host, claim and start times), read under the
    row's lock; None when none is under way (a waiting job being cancelled).

    Read from the row, not the instance: a cancel is not conditional on the claim, and
    its instance may predate the attempt it ends.
    """
    return (
        ContainerJob.objects.select_for_update()
        .filter(pk=job.pk, status__in=states.ACTIVE)
        .values(
            "attempt",
            "assigned_host_id",
            "claimed_at",
            "started_at",
            "attempts_without_outcome",
            "memory_limit",
        )
        .first()
    )


def _write_attempt(
    ended: Mapping[str, Any] | None,
    job: ContainerJob,
    ending: Ending,
    fields: dict[str, Any],
    *,
    error: str,
    retried: bool,
) -> None:
    if ended is None:
        return
    exited = ending.container_exited
    try:
        # In a savepoint: the history is a record of the job, never a condition of ending
        # it. A row that cannot be written (a missing grant, a full disk for that table)
        # must not keep a job running and holding its slot forever.
        with transaction.atomic():
            JobAttempt.objects.create(
                job_id=job.pk,
                attempt=ended["attempt"],
                host_id=ended["assigned_host_id"],
                reason=ending.kind.value,
                exit_code=fields.get("exit_code", ending.exit_code) if exited else None,
                memory_limit=ended["memory_limit"],
                error=mask_text(error, job.environment) if error else "",
                claimed_at=ended["claimed_at"],
                started_at=ended["started_at"],
                ended_at=database_now(),
                retried=retried,
            )
    except DatabaseError:
        logger.exception("job %s: attempt %s ended unrecorded in its history", job.pk, job.attempt)


def _cancel_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "completed_at": database_now(),
        "claimed_by": "",
        "lease_expires_at": None,
        **fields,
    }


def describe(job: ContainerJob, ending: Ending) -> str:
    """The ``last_error`` text of an ending."""
    if ending.kind is End.TIMED_OUT:
        return ending.error or f"timed out after {job.timeout_seconds} seconds; container killed"
    if ending.kind is End.EXITED:
        return ending.error or f"container exited with code {ending.exit_code}"
    if ending.kind is End.OUT_OF_MEMORY:
        return ending.error or _out_of_memory(job.memory_limit, ending.exit_code)
    if ending.kind is End.VANISHED:
        return ending.error or "container vanished while the job was running"
    if ending.kind is End.LAUNCH_FAILED:
        return f"launch failed ({launch_error_type(ending).value}): {ending.error}"
    if ending.kind is End.UNFINISHABLE:
        return f"could not be finished after {app_settings.FINISH_TRIES} tries: {ending.error}"
    return ending.error or "cancelled"


def _out_of_memory(limit: int | None, exit_code: int | None) -> str:
    if limit is None:
        return (
            "out of memory: killed by the kernel with no memory limit set (the host ran out; "
            f"exit code {exit_code})"
        )
    return (
        f"out of memory: the container was killed at its {limit} MiB memory limit "
        f"(exit code {exit_code})"
    )


def finish(
    job: ContainerJob,
    executor: Executor,
    exit_code: int | None,
    *,
    error: str = "",
    timed_out: bool = False,
    out_of_memory: bool = False,
    remove: Remover | None = None,
) -> bool:
    """End the attempt of a container that exited (or was killed past its timeout).

    ``out_of_memory``: Docker says the kernel killed it for memory (``State.OOMKilled``, or
    an ``oom`` event seen for it). A container that exited 0 all the same (the kernel
    killed one of its processes and the job went on) completed.
    """
    kind = End.EXITED
    if timed_out:
        kind = End.TIMED_OUT
    elif out_of_memory and exit_code != 0:
        kind = End.OUT_OF_MEMORY
    ending = Ending(kind, exit_code=exit_code, error=error)
    return end_attempt(job, ending, executor=executor, remove=remove)


def give_up(job: ContainerJob, error: str) -> bool:
    """Fail a job whose finishing keeps failing, without its logs (which may be the cause).

    Whoever holds the claim now could not finish it either, so the write is conditional
    on the attempt and status read here, not on the claim the caller once read. Its
    container may still run, so the job keeps its slot (``stop_pending``) until the
    reconcile pass has seen it stopped.
    """
    ending = Ending(End.UNFINISHABLE, error=error)
    attempt = job.attempt
    try:
        job.refresh_from_db(fields=["status", "claimed_by", "attempt"])
        if job.attempt != attempt or job.status not in states.ACTIVE:
            return False
        return end_attempt(job, ending, stop_pending=True)
    except Exception as exc:
        logger.error(
            "job %s: could not even be failed; trying again later",
            job.pk,
            exc_info=masked_exception(exc, job.environment),
        )
        return False


def announce(job: ContainerJob) -> None:
    """Tell listeners (the Celery result layer) how the job's attempt ended.

    A listener's failure is logged and never undoes or blocks the write already made.
    """
    for receiver, outcome in attempt_ended.send_robust(sender=ContainerJob, job=job):
        if isinstance(outcome, Exception):
            logger.warning(
                "job %s: %r failed on attempt_ended: %s",
                job.pk,
                receiver,
                mask_text(str(outcome), job.environment),
                exc_info=masked_exception(outcome, job.environment),
            )


def remove_container(executor: Executor, name: str) -> None:
    try:
        executor.remove(name)
    except ExecutorError:
        logger.warning("could not remove container %s; cleanup will retry", name, exc_info=True)


def _read_logs(executor: Executor, name: str) -> tuple[str, str]:
    try:
        return executor.logs(name, app_settings.LOG_MAX_BYTES)
    except ExecutorError as exc:
        return "", f"[logs unavailable: {exc}]"
