"""The demo batch, its live progress display and its summary (used by ``run_demo``).

Kept apart from the command that starts processes so that the batch can be built and
checked in tests without a worker.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TextIO

from celery.result import AsyncResult
from django.db import transaction

from django_container_celery import lanes
from django_container_celery.models import ContainerJob, JobAttempt, Lane, database_now
from django_container_celery.states import ACTIVE, FINAL, WAITING, Status

from . import tasks

# Seconds between the batch being queued and the scheduled job becoming due.
SCHEDULE_DELAY = 8
# Jobs of the detached-runs batch, all running at once on a worker of concurrency 2.
FANOUT = 6
# The lanes batch: monthly reports in the ``reports`` lane, at most LANE_LIMIT at once,
# beside a few jobs of no lane; the lane is paused for LANE_PAUSE_SECONDS while some run.
LANE_REPORTS = 6
LANE_LIMIT = 2
LANE_OTHERS = 2
LANE_PAUSE_SECONDS = 4


@dataclasses.dataclass(frozen=True)
class DemoJob:
    """One job of the demo batch: how to queue it and what it should end as."""

    label: str
    shows: str
    expect_status: str
    expect_attempts: int
    queue: Callable[[], AsyncResult]
    # Due at once and run once: its start time shows the order in which slots were given.
    ordered: bool = True


@dataclasses.dataclass
class Tracked:
    entry: DemoJob
    job: ContainerJob
    # The look at the database (counted from 0) in which the job was first seen claimed.
    # Start times cannot show the claim order: two containers claimed a moment apart may
    # start in either order.
    claimed_at_look: int | None = None


def demo_batch(token: str | None = None) -> list[DemoJob]:
    """The mixed batch, in the order it is queued: lowest priority first, so that the run
    order visibly follows priority rather than arrival."""
    token = token or uuid.uuid4().hex
    return [
        DemoJob(
            "tidy_up()",
            "priority 20, queued first, runs last",
            Status.COMPLETED,
            1,
            lambda: tasks.tidy_up.delay(),
        ),
        DemoJob(
            "export_archive(30)",
            "sleeps 30 s with a 5 s timeout: killed, failed, no retry",
            Status.FAILED,
            1,
            lambda: tasks.export_archive.delay(30),
        ),
        DemoJob(
            "build_report(3)",
            "normal priority, runs 3 s, prints its progress",
            Status.COMPLETED,
            1,
            lambda: tasks.build_report.delay(3),
        ),
        DemoJob(
            "legacy_import()",
            "image not found is permanent: failed at once, retries unused",
            Status.FAILED,
            1,
            lambda: tasks.legacy_import.delay(),
            ordered=False,
        ),
        DemoJob(
            "sync_upstream()",
            "exits 75 (in retry_exit_codes), retried after a back-off, then completes",
            Status.COMPLETED,
            2,
            lambda: tasks.sync_upstream.delay(token),
            ordered=False,
        ),
        DemoJob(
            "greet('Ada')",
            "high priority, queued late, runs first",
            Status.COMPLETED,
            1,
            lambda: tasks.greet.delay("Ada"),
        ),
        DemoJob(
            f"greet('later') +{SCHEDULE_DELAY}s",
            f"scheduled with countdown={SCHEDULE_DELAY}: beat dispatches it when due",
            Status.COMPLETED,
            1,
            lambda: tasks.greet.apply_async(args=("later",), countdown=SCHEDULE_DELAY),
            ordered=False,
        ),
    ]


def queue_batch(entries: Sequence[DemoJob]) -> list[Tracked]:
    """Queue every entry in one transaction.

    Run messages are sent when the transaction commits, so the first worker to take a
    message already sees the whole batch and starts the highest priority first.
    """
    with transaction.atomic():
        results = [(entry, entry.queue()) for entry in entries]
    return [
        Tracked(entry, ContainerJob.objects.get(celery_task_id=result.id))
        for entry, result in results
    ]


def refresh(tracked: Iterable[Tracked], look: int = 0) -> None:
    for item in tracked:
        item.job.refresh_from_db()
        # Every claim increments the attempt number.
        if item.claimed_at_look is None and item.job.attempt > 0:
            item.claimed_at_look = look


def all_final(tracked: Iterable[Tracked]) -> bool:
    return all(item.job.status in FINAL for item in tracked)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _since(moment: datetime | None, start: datetime) -> float | None:
    return None if moment is None else (moment - start).total_seconds()


def describe_state(job: ContainerJob, now: datetime) -> str:
    """The status, with when a waiting job becomes due."""
    if job.status in (Status.QUEUED, Status.RETRYING) and job.scheduled_for is not None:
        wait = (job.scheduled_for - now).total_seconds()
        if wait > 0:
            return f"{job.status} (due in {wait:.0f}s)"
    return str(job.status)


COUNTED = (
    Status.QUEUED,
    Status.LAUNCHING,
    Status.RUNNING,
    Status.RETRYING,
    Status.COMPLETED,
    Status.FAILED,
)


def counts_line(tracked: Sequence[Tracked], elapsed: float) -> str:
    counts = Counter(str(item.job.status) for item in tracked)
    parts = [f"{status} {counts.get(status, 0)}" for status in COUNTED]
    if counts.get(Status.CANCELLED):
        parts.append(f"cancelled {counts[Status.CANCELLED]}")
    return f"[{elapsed:5.1f}s] " + "  ".join(parts)


class ProgressDisplay:
    """Shows the batch while it runs.

    On a terminal, one line per job is redrawn in place. Elsewhere (a log file, CI), a
    line of counts is printed every ``interval`` seconds, because cursor movements would
    only garble the file.
    """

    def __init__(
        self, out: TextIO, tracked: Sequence[Tracked], started: datetime, tty: bool
    ) -> None:
        self.out = out
        self.tracked = tracked
        self.started = started
        self.tty = tty
        self.interval = 0.5 if tty else 2.0
        self._drawn = 0
        self._last = 0.0
        self._width = max(len(item.entry.label) for item in tracked)
        self._lanes = any(item.job.lane for item in tracked)
        # Events worth a line of their own (a lane paused, resumed), drawn under the jobs.
        self.notes: list[str] = []

    def note(self, now: datetime, text: str) -> None:
        """Show an event at once: a line of its own in a log, a line under the jobs on a
        terminal (redrawn with them)."""
        line = f"[{(now - self.started).total_seconds():5.1f}s] {text}"
        if not self.tty:
            self.out.write(line + "\n")
            self.out.flush()
            return
        self.notes.append(line)
        self.show(now, force=True)

    def show(self, now: datetime, force: bool = False) -> None:
        clock = time.monotonic()
        if not force and clock - self._last < self.interval:
            return
        self._last = clock
        elapsed = (now - self.started).total_seconds()
        if not self.tty:
            self.out.write(counts_line(self.tracked, elapsed) + "\n")
            self.out.flush()
            return
        columns = shutil.get_terminal_size((100, 20)).columns
        lines = [counts_line(self.tracked, elapsed)]
        for item in self.tracked:
            job = item.job
            exit_code = "" if job.exit_code is None else f"  exit {job.exit_code}"
            lane = f"  {job.lane or '-':<8}" if self._lanes else ""
            lines.append(
                f"  {item.entry.label:<{self._width}}{lane}  {job.priority:>3}  "
                f"{describe_state(job, now):<22} attempt {job.attempt}{exit_code}"
            )
        lines += self.notes
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A")
        for line in lines:
            self.out.write("\x1b[2K" + line[: columns - 1] + "\n")
        self._drawn = len(lines)
        self.out.flush()


HEADERS = ("Job", "Priority", "Status", "Attempts", "Exit", "Started", "Duration")
# The same with each job's lane, for a batch whose jobs use lanes.
LANE_HEADERS = ("Job", "Lane", "Priority", "Status", "Attempts", "Exit", "Started", "Duration")
LANE_TEXT_COLUMNS = (0, 1, 3)


def summary_rows(
    tracked: Sequence[Tracked], started: datetime, with_lane: bool = False
) -> list[tuple[str, ...]]:
    rows = []
    for item in tracked:
        job = item.job
        duration = job.duration
        rows.append(
            (
                item.entry.label,
                *([job.lane or "-"] if with_lane else []),
                str(job.priority),
                str(job.status),
                str(job.attempt),
                "-" if job.exit_code is None else str(job.exit_code),
                "-" if job.started_at is None else f"+{_since(job.started_at, started):.1f}s",
                _seconds(None if duration is None else duration.total_seconds()),
            )
        )
    return rows


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: Iterable[int] = (0, 2)
) -> str:
    """An aligned table: the ``left`` columns (text) left-aligned, the others (numbers)
    right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    left = set(left)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if index in left else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def check(item: Tracked) -> tuple[bool, str]:
    """Whether the job ended as its entry expects, and a one-line account of it."""
    job = item.job
    ok = job.status == item.entry.expect_status and job.attempt == item.entry.expect_attempts
    detail = item.entry.shows
    if job.last_error:
        detail += f" [last error: {first_line(job.last_error, 90)}]"
    elif job.stdout_log.strip():
        detail += f" [output: {first_line(job.stdout_log.strip().splitlines()[-1], 60)}]"
    if not ok:
        detail += (
            f" -- expected {item.entry.expect_status} after {item.entry.expect_attempts} "
            f"attempt(s), got {job.status} after {job.attempt}"
        )
    return ok, detail


def first_line(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def claimed_in_priority_order(tracked: Sequence[Tracked]) -> bool:
    """Whether the jobs that were due together and ran once were claimed highest priority
    first (jobs first seen claimed in the same look count as claimed together).

    The retried, the never started and the scheduled jobs are left out: their claims say
    nothing about the order in which free slots were handed out.
    """
    ordered = [item for item in tracked if item.entry.ordered]
    if any(item.claimed_at_look is None for item in ordered):
        return False
    by_priority = sorted(ordered, key=lambda item: -item.job.priority)
    looks = [item.claimed_at_look or 0 for item in by_priority]
    return looks == sorted(looks)


def summary(tracked: Sequence[Tracked], started: datetime) -> tuple[str, bool]:
    """The summary table and checks as text, and whether every job ended as expected."""
    lines = [format_table(HEADERS, summary_rows(tracked, started)), ""]
    all_ok = True
    for item in tracked:
        ok, detail = check(item)
        all_ok = all_ok and ok
        lines.append(f"  {'ok' if ok else '!!'}  {item.entry.label}: {detail}")
    in_order = claimed_in_priority_order(tracked)
    all_ok = all_ok and in_order
    claimed = sorted(
        (item for item in tracked if item.entry.ordered and item.claimed_at_look is not None),
        key=lambda item: (item.claimed_at_look, -item.job.priority),
    )
    sequence = ", ".join(
        f"{item.entry.label.split('(')[0]} ({item.job.priority})" for item in claimed
    )
    lines.append(
        f"  {'ok' if in_order else '!!'}  queued lowest priority first, claimed by priority: "
        + sequence
    )
    return "\n".join(lines), all_ok


def fanout_batch() -> list[DemoJob]:
    """The second batch: more jobs at once than the worker has processes."""
    return [
        DemoJob(
            f"crunch({n})",
            "4 s of work, started alongside the others",
            Status.COMPLETED,
            1,
            lambda n=n: tasks.crunch.delay(n),
            ordered=False,
        )
        for n in range(FANOUT)
    ]


def peak_running(tracked: Sequence[Tracked]) -> int:
    """Most of these jobs running at one moment, from their start and end times."""
    marks: list[tuple[datetime, int]] = []
    for item in tracked:
        job = item.job
        if job.started_at is not None and job.completed_at is not None:
            marks += [(job.started_at, 1), (job.completed_at, -1)]
    running = peak = 0
    for _, step in sorted(marks, key=lambda mark: (mark[0], mark[1])):
        running += step
        peak = max(peak, running)
    return peak


def fanout_summary(
    tracked: Sequence[Tracked], started: datetime, processes: int
) -> tuple[str, bool]:
    """The detached batch's table and its check: more containers than processes at once."""
    lines = [format_table(HEADERS, summary_rows(tracked, started)), ""]
    all_ok = True
    for item in tracked:
        ok, detail = check(item)
        all_ok = all_ok and ok
        if not ok:
            lines.append(f"  !!  {item.entry.label}: {detail}")
    peak = peak_running(tracked)
    detached = peak > processes
    lines.append(
        f"  {'ok' if detached else '!!'}  a worker of concurrency {processes} kept {peak} "
        "containers running at once: a run holds a worker process only while it launches, "
        "and the watcher in the worker finishes the jobs"
    )
    return "\n".join(lines), all_ok and detached


# -- lanes -------------------------------------------------------------------------------


def ensure_reports_lane() -> Lane:
    """The ``reports`` lane with the demo's limit, running (an interrupted earlier run may
    have left it paused)."""
    lane, _ = Lane.objects.update_or_create(
        name=tasks.REPORTS_LANE,
        defaults={
            "max_concurrent_jobs": LANE_LIMIT,
            "description": "Monthly reports of the demo: a few at a time, paused on demand.",
        },
    )
    lanes.resume([lane.name])
    return lane


def lanes_batch() -> list[DemoJob]:
    """Monthly reports in the ``reports`` lane, and a few jobs of no lane beside them."""
    reports = [
        DemoJob(
            f"monthly_report({month})",
            f"2 s in lane {tasks.REPORTS_LANE}: at most {LANE_LIMIT} at once, held while paused",
            Status.COMPLETED,
            1,
            lambda month=month: tasks.monthly_report.delay(month),
            ordered=False,
        )
        for month in range(1, LANE_REPORTS + 1)
    ]
    others = [
        DemoJob(
            f"crunch({n})",
            "4 s in no lane: runs on while the lane is paused",
            Status.COMPLETED,
            1,
            lambda n=n: tasks.crunch.delay(n),
            ordered=False,
        )
        for n in range(LANE_OTHERS)
    ]
    return [*reports, *others]


class LanePause:
    """Pauses the lane once it holds as many jobs as its limit allows, and resumes it
    ``seconds`` later once its running jobs have finished; says so on the display."""

    def __init__(self, lane: str, limit: int, seconds: float = LANE_PAUSE_SECONDS) -> None:
        self.lane = lane
        self.limit = limit
        self.seconds = seconds
        self.paused_at: datetime | None = None
        self.resumed_at: datetime | None = None
        # The lane's jobs that waited when it was paused: none may start until resumed.
        self.held: list[ContainerJob] = []
        self._paused_clock = 0.0

    def of_lane(self, tracked: Sequence[Tracked]) -> list[ContainerJob]:
        return [item.job for item in tracked if item.job.lane == self.lane]

    def step(self, tracked: Sequence[Tracked], display: ProgressDisplay) -> None:
        """Called after each look at the jobs: pause or resume when it is time to."""
        jobs = self.of_lane(tracked)
        if self.paused_at is None:
            self._maybe_pause(jobs, display)
        elif self.resumed_at is None:
            self._maybe_resume(jobs, display)

    def _maybe_pause(self, jobs: Sequence[ContainerJob], display: ProgressDisplay) -> None:
        # Its first jobs fill the lane's places (or some already ended): pause now.
        running = sum(job.status == Status.RUNNING for job in jobs)
        if running < self.limit and not any(job.status in FINAL for job in jobs):
            return
        lanes.pause([self.lane], by="demo")
        self.paused_at = database_now()
        self._paused_clock = time.monotonic()
        # Read again after the pause: a job claimed just before it may still start.
        for job in jobs:
            job.refresh_from_db()
        self.held = [job for job in jobs if job.status in WAITING and job.attempt == 0]
        holding = sum(job.status in ACTIVE for job in jobs)
        display.note(
            self.paused_at,
            f"lane {self.lane} paused - {holding} running finish, {len(self.held)} waiting "
            "keep their place",
        )

    def _maybe_resume(self, jobs: Sequence[ContainerJob], display: ProgressDisplay) -> None:
        # After the pause's seconds, once the jobs that ran when it began have finished.
        if time.monotonic() - self._paused_clock < self.seconds:
            return
        if any(job.status in ACTIVE for job in jobs):
            return
        lanes.resume([self.lane])
        self.resumed_at = database_now()
        paused_for = (self.resumed_at - (self.paused_at or self.resumed_at)).total_seconds()
        waiting = sum(job.status in WAITING for job in jobs)
        display.note(
            self.resumed_at,
            f"lane {self.lane} resumed after {paused_for:.1f}s - {waiting} waiting start, "
            f"{self.limit} at a time",
        )


def started_while_paused(pause: LanePause) -> set[object]:
    """Ids of the jobs held by the pause that were claimed before it was resumed (read
    from their attempts' history: a finished job's row no longer says when it was
    claimed)."""
    held = [job.pk for job in pause.held]
    if pause.resumed_at is None:
        return set(
            ContainerJob.objects.filter(pk__in=held, attempt__gt=0).values_list("pk", flat=True)
        )
    early = JobAttempt.objects.filter(job__in=held, claimed_at__lt=pause.resumed_at)
    return set(early.values_list("job_id", flat=True))


def ran_while_paused(jobs: Iterable[ContainerJob], pause: LanePause) -> list[ContainerJob]:
    """The jobs that were running at some moment of the pause."""
    if pause.paused_at is None or pause.resumed_at is None:
        return []
    return [
        job
        for job in jobs
        if job.started_at is not None
        and job.started_at < pause.resumed_at
        and (job.completed_at is None or job.completed_at > pause.paused_at)
    ]


def lanes_summary(
    tracked: Sequence[Tracked], started: datetime, pause: LanePause
) -> tuple[str, bool]:
    """The lanes batch's table (with each job's lane) and its checks: the lane's limit
    held, nothing of it started while paused, and jobs of no lane ran on meanwhile."""
    rows = summary_rows(tracked, started, with_lane=True)
    lines = [format_table(LANE_HEADERS, rows, left=LANE_TEXT_COLUMNS), ""]
    all_ok = True
    for item in tracked:
        ok, detail = check(item)
        all_ok = all_ok and ok
        if not ok:
            lines.append(f"  !!  {item.entry.label}: {detail}")
    in_lane = [item for item in tracked if item.job.lane == pause.lane]
    others = [item.job for item in tracked if item.job.lane != pause.lane]
    peak = peak_running(in_lane)
    checks = [
        (
            peak <= pause.limit,
            f"lane {pause.lane} (limit {pause.limit}): at most {peak} of its jobs ran at once",
        ),
    ]
    if pause.paused_at is None or pause.resumed_at is None:
        checks.append((False, f"lane {pause.lane} was not paused and resumed"))
    else:
        early = started_while_paused(pause)
        paused_for = (pause.resumed_at - pause.paused_at).total_seconds()
        checks += [
            (
                not early and bool(pause.held),
                f"lane {pause.lane} paused for {paused_for:.1f}s with {len(pause.held)} "
                f"waiting: {len(early)} of them started meanwhile, all ran once it was resumed",
            ),
            (
                bool(ran_while_paused(others, pause)),
                f"{len(ran_while_paused(others, pause))} job(s) of no lane ran during the pause: "
                "a pause holds back its own lane only",
            ),
        ]
    for ok, text in checks:
        all_ok = all_ok and ok
        lines.append(f"  {'ok' if ok else '!!'}  {text}")
    return "\n".join(lines), all_ok
