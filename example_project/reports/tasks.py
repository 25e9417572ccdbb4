"""Container tasks of the example app.

Each function returns the command its container runs; ``@container_task`` turns it into
something with ``.delay()``, ``.apply_async()`` and ``.s()`` like a Celery task. The
commands use only busybox tools, so they run in the locally built demo image.
"""

from __future__ import annotations

import shlex

from django.conf import settings

from django_container_celery import container_task
from django_container_celery.models import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL

IMAGE = settings.DEMO_IMAGE
# An image that no demo step builds, so its launch fails the way a typo would.
MISSING_IMAGE = "dcc-demo/never-built:1.0"
# EX_TEMPFAIL from sysexits.h: the usual way for a program to say "try again later".
TEMPORARY_FAILURE = 75
# The lane of the monthly reports: the demo creates it (a Lane row must exist before a job
# names it) with a limit, and pauses and resumes it while its jobs wait.
REPORTS_LANE = "reports"


@container_task(image=IMAGE, priority=PRIORITY_HIGH, max_retries=0, timeout_seconds=30)
def greet(name: str) -> str:
    return "echo " + shlex.quote(f"Hello, {name}!")


@container_task(
    image=IMAGE,
    priority=PRIORITY_NORMAL,
    timeout_seconds=60,
    memory_limit=64,
    # The admin masks values whose names look secret (…TOKEN, …PASSWORD, …KEY, …SECRET).
    environment={"REPORT_FORMAT": "csv", "STORAGE_TOKEN": "example-not-a-real-token"},
)
def build_report(pages: int) -> str:
    script = f"for p in $(seq {int(pages)}); do echo page $p of {int(pages)}; sleep 1; done"
    return "sh -c " + shlex.quote(script + "; echo report ready as $REPORT_FORMAT")


@container_task(image=IMAGE, priority=PRIORITY_LOW, max_retries=0, timeout_seconds=30)
def tidy_up() -> str:
    return "sh -c " + shlex.quote("echo nothing left to tidy")


@container_task(
    image=IMAGE,
    priority=60,
    max_retries=2,
    retry_strategy="demo",
    retry_exit_codes=[TEMPORARY_FAILURE],
    bind_mounts=[f"{settings.JOB_STATE_DIR}:/state"],
    timeout_seconds=30,
)
def sync_upstream(token: str) -> str:
    """Fails with exit 75 on its first attempt and succeeds on the next.

    Every attempt starts a fresh container, so the attempt leaves a marker file on a
    bind-mounted host folder for the next one to find.
    """
    marker = f"/state/{token}"
    script = (
        f"if [ -e {marker} ]; then echo upstream answered; exit 0; fi; "
        f"touch {marker}; echo upstream busy, try later >&2; exit {TEMPORARY_FAILURE}"
    )
    return "sh -c " + shlex.quote(script)


@container_task(image=IMAGE, priority=40, max_retries=0, timeout_seconds=5)
def export_archive(seconds: int) -> str:
    """Sleeps; asked for longer than its 5 s timeout, it is killed and fails."""
    return f"sleep {int(seconds)}"


@container_task(image=MISSING_IMAGE, priority=PRIORITY_NORMAL, max_retries=3)
def legacy_import() -> str:
    """Its image does not exist: a permanent error, so none of its 3 retries is used."""
    return "legacy-import --all"


@container_task(image=IMAGE, priority=30, max_retries=0, timeout_seconds=30)
def crunch(chunk: int) -> str:
    """A few seconds of work: many at once show that runs do not hold worker processes."""
    return "sh -c " + shlex.quote(f"sleep 4; echo chunk {int(chunk)} done")


@container_task(
    image=IMAGE, priority=PRIORITY_NORMAL, lane=REPORTS_LANE, max_retries=0, timeout_seconds=30
)
def monthly_report(month: int) -> str:
    """Two seconds of work in the ``reports`` lane: its limit and pause hold it back."""
    return "sh -c " + shlex.quote(f"sleep 2; echo report for month {int(month)} done")
