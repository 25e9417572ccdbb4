"""Run container jobs without Celery: claim and launch in a loop, watch in a thread.

Each round rescues what no watcher looks after and launches ready jobs up to
``--max-concurrent`` (a global limit shared with every other worker). The command runs the
same watcher as a Celery worker (``watching.py``): it leads the hosts no other watcher
leads, finishes jobs from Docker's events and reconciles. SIGTERM or SIGINT stops claiming
and waits up to the shutdown timeout for the jobs this command launched; jobs still
running then keep their containers and are finished by another watcher, or adopted by a
rescue after their lease expires. SIGUSR1 prints queue metrics.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from ... import claims, placement
from ...conf import app_settings
from ...models import ContainerJob
from ...queue import JobQueueManager, default_worker_id
from ...states import ACTIVE, Status
from ...watching import Watcher

# How many of the ready jobs that would not launch now a dry run explains.
DRY_RUN_WAITING_SHOWN = 10


class Command(BaseCommand):
    help = "Process queued container jobs (claim, launch, harvest) without Celery."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--queue-mode",
            action="store_true",
            help="Only run jobs that were queued. Without it, pending jobs are queued first.",
        )
        parser.add_argument(
            "--max-concurrent",
            type=int,
            default=None,
            help="Global limit on running jobs (default: MAX_CONCURRENT_JOBS).",
        )
        parser.add_argument(
            "--poll-interval", type=float, default=2.0, help="Seconds between rounds."
        )
        parser.add_argument(
            "--once",
            action="store_true",
            help="Run one round, wait for the jobs it launched, then exit.",
        )
        parser.add_argument(
            "--timeout", type=float, default=None, help="Stop (gracefully) after this many seconds."
        )
        parser.add_argument(
            "--shutdown-timeout",
            type=float,
            default=None,
            help="Seconds to wait for running jobs on shutdown (default: SHUTDOWN_TIMEOUT).",
        )
        parser.add_argument(
            "--worker-id", default=None, help="Owner name recorded in claims (default: host:pid)."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Show what would be launched, change nothing."
        )
        parser.add_argument("--verbose", action="store_true", help="Print every round.")

    def handle(self, *args: Any, **options: Any) -> None:
        self.verbose = options["verbose"]
        self.stopping = threading.Event()
        # Set by signal handlers, acted on by the loop (see _install_signals).
        self.stop_signal: int | None = None
        self.metrics_requested = False
        worker_id = options["worker_id"] or default_worker_id()
        manager = JobQueueManager(worker_id=worker_id)
        limit = options["max_concurrent"] or app_settings.MAX_CONCURRENT_JOBS
        if options["dry_run"]:
            self._dry_run(manager, limit)
            return
        self._install_signals(manager)
        self.launched: set[Any] = set()
        # Its own claimant id: a launch of this process that the watcher takes over must
        # then fail its claim checks.
        self.watcher = Watcher(f"watcher@{worker_id}") if app_settings.WATCHER else None
        if self.watcher is not None:
            self.watcher.start()
        try:
            self._loop(manager, limit, options)
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def _loop(self, manager: JobQueueManager, limit: int, options: dict[str, Any]) -> None:
        worker_id = manager.worker_id
        started = time.monotonic()
        deadline = None if options["timeout"] is None else started + options["timeout"]
        self.stdout.write(f"worker {worker_id}: processing jobs (max concurrent {limit})")
        while not self.stopping.is_set():
            self._round(manager, limit, queue_pending=not options["queue_mode"])
            if options["once"]:
                self._drain(manager, deadline)
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.stdout.write("time limit reached")
                break
            self._pause(manager, options["poll_interval"])
        self._attend_signals(manager)
        self._shutdown(manager, options["shutdown_timeout"])

    # -- one round ----------------------------------------------------------------------

    def _pause(self, manager: JobQueueManager, seconds: float) -> None:
        """Wait between rounds, answering signals within a tenth of a second."""
        end = time.monotonic() + seconds
        while True:
            self._attend_signals(manager)
            left = end - time.monotonic()
            if left <= 0 or self.stopping.is_set():
                return
            time.sleep(min(0.1, left))

    def _round(self, manager: JobQueueManager, limit: int, queue_pending: bool) -> None:
        if queue_pending:
            for job in ContainerJob.objects.filter(status=Status.PENDING).order_by("created_at"):
                try:
                    manager.queue_job(job)
                except ValueError:
                    continue  # moved on since we read it
        rescued = manager.rescue_stale_jobs()
        batch = manager.launch_next_batch(max_concurrent=limit)
        self.launched.update(batch["job_ids"])
        before = len(self.launched)
        self._forget_final()
        finished = before - len(self.launched)
        for error in batch["errors"]:
            self.stderr.write(f"launch error: {error}")
        if self.verbose or batch["launched"] or finished or rescued:
            self.stdout.write(
                f"{timezone.now():%H:%M:%S} launched={batch['launched']} "
                f"finished={finished} rescued={rescued} errors={len(batch['errors'])}"
            )

    def _forget_final(self) -> None:
        """Forget launched jobs that no longer hold a slot (final, or waiting to retry)."""
        if self.launched:
            active = ContainerJob.objects.filter(pk__in=list(self.launched), status__in=ACTIVE)
            self.launched.intersection_update(active.values_list("pk", flat=True))

    def _own_running(self, manager: JobQueueManager) -> int:
        """Jobs this command launched that are not final yet (the watcher finishes them)."""
        if self.watcher is None:
            manager.harvest_finished_jobs()  # no watcher: reconcile here
        self._forget_final()
        return len(self.launched)

    def _drain(self, manager: JobQueueManager, deadline: float | None) -> None:
        """Harvest until this worker runs nothing, the deadline passes, or a signal."""
        while self._own_running(manager) and not self.stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.1)
            self._attend_signals(manager)

    def _shutdown(self, manager: JobQueueManager, timeout: float | None) -> None:
        wait = app_settings.SHUTDOWN_TIMEOUT if timeout is None else timeout
        end = time.monotonic() + wait
        while self._own_running(manager) and time.monotonic() < end:
            self._attend_signals(manager)
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        left = self._own_running(manager)
        if left:
            self.stdout.write(
                f"stopped with {left} job(s) still running; they keep their containers and "
                "are finished by another watcher, or adopted by a rescue when their lease "
                "expires"
            )
        else:
            self.stdout.write("stopped cleanly")

    # -- signals and reporting --------------------------------------------------------------

    def _install_signals(self, manager: JobQueueManager) -> None:
        # A handler runs between two bytecodes, possibly in the middle of a query on the
        # very connection it would use, which would then wait forever for a lock the
        # interrupted code holds. So handlers only record the request; the loop acts on it.
        def stop(signum: int, frame: FrameType | None) -> None:
            stopping = self.stop_signal is not None or self.stopping.is_set()
            if stopping and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: leave now
            self.stop_signal = signum

        def metrics(signum: int, frame: FrameType | None) -> None:
            self.metrics_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, metrics)

    def _attend_signals(self, manager: JobQueueManager) -> None:
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            self.stop_signal = None
            self.stdout.write(f"received {name}: no new jobs, finishing")
            self.stopping.set()
        if self.metrics_requested:
            self.metrics_requested = False
            self.stdout.write(json.dumps(manager.get_worker_metrics(), sort_keys=True))

    def _dry_run(self, manager: JobQueueManager, limit: int) -> None:
        free = max(0, limit - ContainerJob.objects.active().count())
        # The claim's own placement rules decide, so a job too big for its host's free
        # memory is listed under the waiting jobs rather than as launching.
        fitting = claims.eligible_ready_ids(free + DRY_RUN_WAITING_SHOWN)
        launch_ids = fitting[:free]
        by_id = ContainerJob.objects.in_bulk(launch_ids)
        jobs = [by_id[pk] for pk in launch_ids if pk in by_id]
        self.stdout.write(f"dry run: {len(jobs)} job(s) would be launched now")
        for job in jobs:
            self.stdout.write(f"  {job.pk} priority={job.priority} image={job.docker_image}")
        self._dry_run_waits(manager, launch_ids, set(fitting[free:]), limit)
        self.stdout.write(json.dumps(manager.get_worker_metrics(), sort_keys=True))

    def _dry_run_waits(
        self, manager: JobQueueManager, launch_ids: list[Any], fit_later: set[Any], limit: int
    ) -> None:
        """Why the first ready jobs that would not launch now wait."""
        waiting = manager.get_ready_jobs(limit=DRY_RUN_WAITING_SHOWN, exclude_ids=launch_ids)
        for job in waiting:
            reasons = _waits(job, job.pk in fit_later, limit)
            self.stdout.write(f"  {job.pk} priority={job.priority} waits: {'; '.join(reasons)}")


def _waits(job: ContainerJob, fits_a_host: bool, limit: int) -> list[str]:
    reasons = placement.why_waiting(job)
    if fits_a_host and not any(line.startswith(placement.GLOBAL_LIMIT) for line in reasons):
        # Room on a host, but the free slots under this run's limit went to the jobs
        # before it: a reason why_waiting cannot see, since the limit may come from
        # --max-concurrent.
        reasons = [line for line in reasons if not line.startswith(placement.FITS_NOW)]
        reasons.append(f"the free slots under the limit of {limit} jobs go to the jobs above")
    return reasons
