"""Celery beat against real worker and beat processes, Redis, PostgreSQL and Docker.

Ordering under a capacity of one, scheduled jobs, retries after their back-off, the
django-celery-beat installation command and its database scheduler, and the task that
creates jobs for periodic schedules.
"""

from __future__ import annotations

import itertools
import os
import random
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from django_container_celery.api import RUN_TASK
from django_container_celery.beat import CLEANUP_TASK, DISPATCH_TASK, RESCUE_TASK
from django_container_celery.conf import app_settings
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import queue_manager
from django_container_celery.states import Status

from .celery_app import app
from .celery_support import celery_cluster, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]

CREATE_TASK = "django_container_celery.create_container_job"


def make_job(image: str, command: str = "echo hello", **fields: Any) -> ContainerJob:
    fields.setdefault("timeout_seconds", 120)
    return ContainerJob.objects.create_job(docker_image=image, command=command, **fields)


def reload(job: ContainerJob) -> ContainerJob:
    return ContainerJob.objects.get(pk=job.pk)


def wait_final(jobs: list[ContainerJob], timeout: float) -> list[ContainerJob]:
    ids = [job.pk for job in jobs]

    def all_final() -> list[ContainerJob] | None:
        rows = {row.pk: row for row in ContainerJob.objects.filter(pk__in=ids)}
        if all(rows[pk].is_final for pk in ids):
            return [rows[pk] for pk in ids]
        return None

    def describe() -> str:
        rows = ContainerJob.objects.filter(pk__in=ids).values_list("priority", "status")
        return f"jobs not final within {timeout}s: {sorted(rows)}"

    try:
        return wait_for(all_final, timeout)
    except AssertionError:
        raise AssertionError(describe()) from None


# -- priority, then FIFO, whatever order the messages arrive in -------------------------------

PRIORITIES = [20, 80, 50, 80, 20, 50, 80, 50, 20, 50]


@pytest.mark.parametrize("messages", ["delay-shuffled", "reversed-equal-broker-priority"])
def test_capacity_one_starts_jobs_by_priority_then_fifo(
    broker_url: str, test_image: str, messages: str
) -> None:
    created = [
        make_job(test_image, "sh -c 'sleep 0.3'", priority=p, name=f"p{p}-{i}")
        for i, p in enumerate(PRIORITIES)
    ]
    # Queue in an order unrelated to creation, so FIFO means queued_at, not created_at.
    queue_order = list(reversed(created))
    random.Random(20240607).shuffle(queue_order)

    with celery_cluster(broker_url, MAX_CONCURRENT_JOBS=1) as cluster:
        cluster.worker("w1", concurrency=2)
        cluster.beat()
        if messages == "delay-shuffled":
            with transaction.atomic():
                for job in queue_order:
                    job.delay()
        else:
            # Every message at the same broker priority, sent in exactly the reverse of the
            # launch order: the first message the worker sees is for the job that must run last.
            with transaction.atomic():
                for job in queue_order:
                    queue_manager.queue_job(job)
            rows = list(ContainerJob.objects.ready())
            assert len(rows) == len(PRIORITIES)
            ContainerJob.objects.filter(pk__in=[r.pk for r in rows]).update(
                dispatched_at=timezone.now()
            )
            for row in reversed(rows):
                app.send_task(RUN_TASK, args=[str(row.pk)], task_id=f"ordered-{row.pk}", priority=5)

        done = wait_final(created, timeout=120)

    assert [job.status for job in done] == [Status.COMPLETED] * len(PRIORITIES)
    by_start = sorted(done, key=lambda job: job.started_at)
    expected = sorted(done, key=lambda job: (-job.priority, job.queued_at))
    # The test is only meaningful if the queue order was not already the launch order.
    by_queueing = sorted(done, key=lambda job: job.queued_at)
    assert [j.pk for j in by_queueing] != [j.pk for j in expected]
    by_creation = sorted(done, key=lambda job: (-job.priority, job.created_at))
    assert [j.pk for j in by_creation] != [j.pk for j in expected]
    assert [(j.priority, j.name) for j in by_start] == [(j.priority, j.name) for j in expected]
    # Capacity one: each job started only after the previous one was finished.
    for before, after in itertools.pairwise(by_start):
        assert before.completed_at <= after.started_at, (before.name, after.name)


# -- scheduled jobs ---------------------------------------------------------------------------


def test_scheduled_job_starts_at_its_time_within_one_dispatch_interval(
    broker_url: str, test_image: str
) -> None:
    with celery_cluster(broker_url) as cluster:
        cluster.worker("w1", concurrency=2)
        cluster.beat()
        job = make_job(test_image, "echo later")
        job.apply_async(countdown=4)
        job.refresh_from_db()
        assert job.status == Status.QUEUED and job.scheduled_for is not None
        assert job.dispatched_at is None  # nothing sent for a job due later

        seen_early: list[str] = []
        claims: list[Any] = []

        def claimed() -> bool:
            row = reload(job)
            if timezone.now() < row.scheduled_for:
                seen_early.append(row.status)
            if row.claimed_at is not None:
                claims.append(row.claimed_at)
            return row.status not in (Status.QUEUED, Status.RETRYING)

        wait_for(claimed, timeout=60, interval=0.02)
        final = reload(job).wait(timeout=60)

    assert seen_early, "the job left the queue before its time could even be observed"
    assert set(seen_early) == {Status.QUEUED}, seen_early
    assert claims, "the claim was never observed"
    assert final.status == Status.COMPLETED and final.stdout_log == "later\n"
    interval = float(app_settings.DISPATCH_INTERVAL)
    claim_lag = (claims[0] - final.scheduled_for).total_seconds()
    start_lag = (final.started_at - final.scheduled_for).total_seconds()
    print(f"scheduled job claimed {claim_lag:.3f}s and started {start_lag:.3f}s after its time")
    assert claims[0] >= final.scheduled_for and final.started_at >= final.scheduled_for
    # Dispatch: the claim comes within one dispatch interval (plus message latency).
    assert claim_lag < interval + 1.5
    # Start: plus the container launch, which a busy Docker daemon can stretch to seconds.
    assert start_lag < interval + 5


# -- a retry is dispatched after its back-off ------------------------------------------------


def test_retry_after_back_off_until_max_retries(broker_url: str, test_image: str) -> None:
    socket_path = "/tmp/dcc-no-such.sock"
    assert not os.path.exists(socket_path)
    host = ExecutorHost.objects.create(
        name="unreachable", connection_string=f"unix://{socket_path}"
    )
    job = make_job(test_image, "echo never", docker_host=host, retry_strategy="fast", max_retries=2)
    snapshots: list[tuple[str, int, Any, Any, int]] = []

    def record() -> bool:
        row = reload(job)
        snap = (row.status, row.retry_count, row.scheduled_for, row.last_error_at, row.attempt)
        if not snapshots or snapshots[-1] != snap:
            snapshots.append(snap)
        return row.is_final

    # Health would mark the host unhealthy after a few failed calls, and a job pinned to
    # an unhealthy host waits for it (test_controls.py); here the retries are under test.
    with celery_cluster(broker_url, HOST_FAILURES_BEFORE_UNHEALTHY=1000) as cluster:
        cluster.worker("w1", concurrency=2)
        cluster.beat()
        job.delay()
        try:
            wait_for(record, timeout=40, interval=0.05)
        except AssertionError:
            raise AssertionError(f"job not final in 40s; transitions: {snapshots}") from None

    final = reload(job)
    print("transitions:", [(s, rc, a) for s, rc, _, _, a in snapshots])
    assert final.status == Status.FAILED, final.status
    assert final.retry_count == 2 and final.attempt == 3
    assert "launch failed" in final.last_error and "permanent" not in final.last_error

    retries = {rc: (sched, err) for status, rc, sched, err, _ in snapshots if status == "retrying"}
    assert set(retries) == {1, 2}, snapshots
    (s1, e1), (s2, e2) = retries[1], retries[2]
    # Back-off of the "fast" strategy: 1 s, then 2 s, without jitter.
    assert s1 - e1 == timedelta(seconds=1)
    assert s2 - e2 == timedelta(seconds=2)
    # Each attempt failed only after the previous back-off had elapsed...
    assert e2 >= s1 and final.last_error_at >= s2
    # ...and was dispatched within a dispatch interval (plus a launch) after it.
    slack = timedelta(seconds=float(app_settings.DISPATCH_INTERVAL) + 3)
    assert e2 - s1 < slack, e2 - s1
    assert final.last_error_at - s2 < slack, final.last_error_at - s2


# -- django-celery-beat: setup command and the database scheduler ----------------------------


def run_setup() -> str:
    out = StringIO()
    call_command("setup_container_beat", stdout=out)
    return out.getvalue()


def test_setup_container_beat_is_idempotent_and_database_scheduler_dispatches(
    broker_url: str, test_image: str
) -> None:
    from django_celery_beat.models import PeriodicTask

    first = run_setup()
    second = run_setup()
    tasks = (DISPATCH_TASK, RESCUE_TASK, CLEANUP_TASK)
    for task in tasks:
        assert PeriodicTask.objects.filter(task=task).count() == 1, task
    assert first.count("created") == 3, first
    lines = second.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("unchanged") for line in lines), second

    job = make_job(test_image, "echo from-db-scheduler")
    queue_manager.queue_job(job)  # queued in the database only: no message is sent
    assert reload(job).dispatched_at is None

    with celery_cluster(broker_url) as cluster:
        cluster.worker("w1", concurrency=2)
        beat = cluster.celery(
            "beat-db",
            "beat",
            "-l",
            "info",
            "-S",
            "django_celery_beat.schedulers:DatabaseScheduler",
            "--max-interval",
            "1",
        )
        final = reload(job).wait(timeout=60)
        log = beat.log_path.read_text(errors="replace")

    assert final.status == Status.COMPLETED and final.stdout_log == "from-db-scheduler\n"
    assert "DatabaseScheduler" in log
    assert f"({DISPATCH_TASK})" in log, log[-2000:]
    # The scheduler's own sync of the app's schedule must not have duplicated the entries.
    for task in tasks:
        assert PeriodicTask.objects.filter(task=task).count() == 1, task
    third = run_setup()
    assert all(line.startswith("unchanged") for line in third.strip().splitlines()), third


# -- the task behind periodic container jobs -------------------------------------------------


def test_create_container_job_task_from_definition_and_from_template(
    broker_url: str, test_image: str
) -> None:
    template = make_job(
        test_image,
        "sh -c 'echo $GREETING from template'",
        name="nightly-template",
        priority=30,
        environment={"GREETING": "hello"},
        max_retries=1,
        timeout_seconds=90,
    )
    with celery_cluster(broker_url) as cluster:
        cluster.worker("w1", concurrency=2)
        direct_id = app.send_task(
            CREATE_TASK,
            kwargs={"docker_image": test_image, "command": "echo periodic", "priority": 70},
        ).get(timeout=60)
        copied_id = app.send_task(
            CREATE_TASK, kwargs={"template": str(template.pk), "name": "nightly-run"}
        ).get(timeout=60)
        direct = ContainerJob.objects.get(pk=direct_id).wait(timeout=60)
        copied = ContainerJob.objects.get(pk=copied_id).wait(timeout=60)

    assert direct.status == Status.COMPLETED and direct.stdout_log == "periodic\n"
    assert direct.priority == 70 and direct.docker_image == test_image

    assert copied.pk != template.pk
    assert copied.status == Status.COMPLETED, copied.last_error
    assert copied.stdout_log == "hello from template\n"
    assert copied.name == "nightly-run"  # the override
    for field in ("docker_image", "command", "environment", "priority", "max_retries"):
        assert getattr(copied, field) == getattr(template, field), field
    assert copied.timeout_seconds == 90
    template.refresh_from_db()
    assert template.status == Status.PENDING and template.execution_id == ""
    assert ContainerJob.objects.count() == 3
