"""Where a claimed job's container is started.

The caller holds the claim (the job is ``launching``). Success moves the job to
``running``; a failure ends the attempt through ``finishing.end_attempt``. Every write is
conditional on the claim. A launch renews its lease while the daemon works (image pulls
included) for at most ``LAUNCH_TIMEOUT`` seconds; past that its lease runs out and a
watcher continues the same attempt under the same container name, so the daemon itself
refuses a second container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.db import DatabaseError, connection
from django.utils import timezone

from . import health, states
from .claims import renew_lease
from .conf import app_settings
from .exceptions import ExecutorError, TransitionConflict
from .executors.base import (
    ATTEMPT_LABEL,
    INSTALLATION_LABEL,
    JOB_LABEL,
    ContainerExists,
    ContainerSpec,
    Executor,
    StartFailed,
)
from .finishing import announce, end_attempt
from .installation import installation_id
from .masking import mask_text
from .models import ContainerJob
from .outcomes import End, Ending
from .states import Status
from .validators import bind_mount_allowed, parse_bind_mount

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LaunchOutcome:
    success: bool
    error: str | None = None
    retry_scheduled: bool = False
    retry_in_seconds: float | None = None
    adopted: bool = False

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"success": self.success, "error": self.error}
        result["retry_scheduled"] = self.retry_scheduled
        if self.retry_scheduled:
            result["retry_in_seconds"] = self.retry_in_seconds
        return result


class LaunchRefused(ExecutorError):
    """The job's definition cannot be launched (a permanent error, never retried)."""


def build_spec(job: ContainerJob) -> ContainerSpec:
    mounts = []
    for entry in job.bind_mounts or []:
        try:
            host_path, target, read_only = parse_bind_mount(str(entry))
        except ValueError as exc:
            raise LaunchRefused(f"invalid bind mount: {exc}") from exc
        # Checked again at launch: the allow-list may have shrunk since the job was saved.
        if not bind_mount_allowed(host_path):
            raise LaunchRefused(f"bind mount {host_path} is not in ALLOWED_BIND_MOUNTS")
        mounts.append((host_path, target, read_only))
    host = job.assigned_host
    return ContainerSpec(
        name=job.container_name,
        image=job.docker_image,
        command=job.command_args or None,
        environment={str(k): str(v) for k, v in (job.environment or {}).items()},
        labels={
            JOB_LABEL: str(job.pk),
            ATTEMPT_LABEL: str(job.attempt),
            INSTALLATION_LABEL: installation_id(),
        },
        working_dir=job.working_directory or None,
        memory_mb=job.memory_limit,
        cpus=job.cpu_limit,
        bind_mounts=tuple(mounts),
        network_mode=app_settings.NETWORK_MODE,
        auto_pull=bool(host and host.auto_pull_images),
    )


def launch_claimed(
    job: ContainerJob,
    executor: Executor,
    on_started: Callable[[ContainerJob, str], None] | None = None,
    *,
    replaced: bool = False,
) -> LaunchOutcome:
    """Start the container of the job's current attempt and record it as running.

    ``on_started`` runs after the container started and before the row says ``running``:
    nothing can finish the job before it returns, so whatever it reports (the Celery
    task's RUNNING state) can never overwrite the job's final result.
    """
    try:
        # Fenced between create and start: a launcher that outlived its lease must not
        # start a container once the attempt was taken over (perhaps already finished).
        spec = dataclasses.replace(build_spec(job), may_start=lambda: renew_lease(job))
        with keep_leased(job):
            container_id = executor.start(spec)
        adopted = False
    except ContainerExists as exists:
        if exists.unstarted and not replaced and _replace_unstarted(job, executor, exists.name):
            return launch_claimed(job, executor, on_started, replaced=True)
        # This attempt's container was started before (a redelivered message, or a
        # rescue): follow that one rather than start another.
        container_id, adopted = exists.container_id, True
    except StartFailed as exc:
        return _start_failed(job, executor, exc)
    except Exception as exc:
        return record_launch_failure(job, exc)
    _host_answered(job)
    if on_started is not None:
        try:
            on_started(job, container_id)
        except Exception:  # reporting must never cost the launch
            logger.warning("job %s: on_started failed", job.pk, exc_info=True)
    try:
        job.mark_as_running(as_claimant=True, execution_id=container_id)
    except TransitionConflict:
        return _claim_lost(job, executor, "" if adopted else container_id)
    return LaunchOutcome(True, adopted=adopted)


def _host_answered(job: ContainerJob) -> None:
    """A launch that reached the daemon clears its host's failures, including those that
    other launches recorded while this one was starting."""
    if job.assigned_host_id is None:
        return
    try:
        health.record_success(job.assigned_host_id)
    except DatabaseError:
        # The host's health is a report: it must never cost the launch its running state.
        logger.warning("job %s: could not record its host's success", job.pk, exc_info=True)


def _replace_unstarted(job: ContainerJob, executor: Executor, name: str) -> bool:
    """Remove the attempt's never-started container, only while our claim holds.

    A launcher whose claim moved on must leave it: it may be the new owner's, about to
    start. Starting it ourselves instead could race its first launcher's start and run
    the attempt twice.
    """
    return renew_lease(job) and executor.remove_unstarted(name)


def _start_failed(job: ContainerJob, executor: Executor, exc: StartFailed) -> LaunchOutcome:
    if exc.gone:
        # Removed between our create and our start: the attempt vanished.
        end_attempt(job, Ending(End.VANISHED, error=_describe(exc)))
        return LaunchOutcome(False, mask_text(_describe(exc), job.environment))
    stop_pending = False
    if renew_lease(job):  # ours to remove only while the claim holds
        # By id: the name may already belong to a replacement the new owner started.
        stop_pending = not _discard(executor, exc.container_id or exc.name)
    return record_launch_failure(job, exc, stop_pending=stop_pending)


def _claim_lost(job: ContainerJob, executor: Executor, started_id: str) -> LaunchOutcome:
    """Our claim moved on while we started the container: leave the row as it is.

    ``started_id`` is the container this call created ("" when it adopted one): only that
    one may be removed, by id, since the attempt's name may now be someone else's.
    """
    attempt = job.attempt
    job.refresh_from_db()
    if job.status in states.ACTIVE and job.attempt == attempt:
        # Another owner took this attempt over and adopted the container: it is theirs.
        logger.warning("job %s: claim lost while launching; the new owner keeps it", job.pk)
    elif started_id:
        logger.warning("job %s: claim lost while launching; removing its container", job.pk)
        _discard(executor, started_id)
    if job.is_final:
        # Cancelled meanwhile: publish the outcome again, after the RUNNING report above.
        announce(job)
    return LaunchOutcome(False, "claim lost before the container was recorded")


@contextlib.contextmanager
def keep_leased(job: ContainerJob) -> Iterator[None]:
    """Renew the launch's lease while the container is being started (image pulls can take
    longer than a lease), so that no watcher takes over a launch that is alive; for at
    most ``LAUNCH_TIMEOUT`` seconds, after which the launch is left to be taken over."""
    stop = threading.Event()
    every = max(1.0, app_settings.LEASE_SECONDS / 3)
    give_up_at = time.monotonic() + float(app_settings.LAUNCH_TIMEOUT)

    def renew() -> None:
        try:
            while not stop.wait(every):
                if time.monotonic() >= give_up_at:
                    logger.warning(
                        "job %s: launch still running after LAUNCH_TIMEOUT; its lease is "
                        "left to expire so that a watcher continues the attempt",
                        job.pk,
                    )
                    return
                if not renew_lease(job):
                    return  # the claim moved on; the launch will find out
        finally:
            connection.close()  # this thread's own connection

    renewer = threading.Thread(target=renew, name="dcc-launch-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(5)


def record_launch_failure(
    job: ContainerJob, exc: BaseException, *, stop_pending: bool = False
) -> LaunchOutcome:
    """End an attempt whose launch failed: retried when transient, failed when permanent.

    ``stop_pending``: a container of the attempt may be left (its removal failed), so the
    job keeps its slot, and takes no new attempt, until the reconcile pass stops it.
    """
    if health.daemon_did_not_answer(exc):
        health.record_failure(job.assigned_host_id, exc)
    ending = Ending(
        End.LAUNCH_FAILED,
        error=_describe(exc),
        exception=exc,
        refused=isinstance(exc, LaunchRefused),
    )
    fields: dict[str, Any] = {"stop_pending": True} if stop_pending else {}
    if not end_attempt(job, ending, **fields):
        return LaunchOutcome(False, mask_text(ending.error, job.environment))
    message = mask_text(job.last_error, job.environment)
    logger.info("job %s: %s -> %s", job.pk, message, job.status)
    if job.status == Status.RETRYING and job.scheduled_for is not None:
        delay = (job.scheduled_for - timezone.now()).total_seconds()
        return LaunchOutcome(False, message, retry_scheduled=True, retry_in_seconds=delay)
    return LaunchOutcome(False, message)


def _describe(exc: BaseException) -> str:
    """The error for ``last_error``: the runtime's own message, with our context if any."""
    original = getattr(exc, "original", None)
    if original is None or not str(original):
        return f"{type(exc).__name__}: {exc}"
    if str(original) in str(exc):  # the wrapper already quotes it, with context
        return f"{type(original).__name__}: {exc}"
    return f"{type(original).__name__}: {original}"


def _discard(executor: Executor, name_or_id: str) -> bool:
    try:
        executor.remove(name_or_id)
    except ExecutorError:
        logger.exception("could not remove container %s", name_or_id)
        return False
    return True
