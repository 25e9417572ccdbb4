"""Model properties and the mark_as_* helpers."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from django_container_celery import models as m
from django_container_celery.models import ContainerJob, container_name
from django_container_celery.states import Status

pytestmark = pytest.mark.django_db


def make_job(**fields: object) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    return ContainerJob.objects.create(**fields)


def test_constants_and_defaults() -> None:
    assert (m.PRIORITY_HIGH, m.PRIORITY_NORMAL, m.PRIORITY_LOW) == (80, 50, 20)
    job = make_job()
    assert job.status == Status.PENDING
    assert (job.priority, job.retry_count, job.max_retries, job.attempt) == (50, 0, 3, 0)
    assert job.environment == {} and job.retry_exit_codes == []


NOW = timezone.now()
PAST = NOW - timedelta(minutes=5)
FUTURE = NOW + timedelta(hours=1)


@pytest.mark.parametrize(
    ("fields", "queue_status", "ready"),
    [
        ({"status": "pending"}, "not_queued", False),
        ({"status": "queued", "queued_at": PAST}, "queued", True),
        ({"status": "queued", "queued_at": PAST, "scheduled_for": PAST}, "queued", True),
        ({"status": "queued", "queued_at": PAST, "scheduled_for": FUTURE}, "scheduled", False),
        ({"status": "queued", "queued_at": PAST, "claimed_by": "w"}, "queued", False),
        ({"status": "retrying", "queued_at": PAST, "scheduled_for": FUTURE}, "scheduled", False),
        ({"status": "retrying", "queued_at": PAST, "scheduled_for": PAST}, "queued", True),
        ({"status": "launching", "queued_at": PAST, "claimed_by": "w"}, "queued", False),
        ({"status": "running", "queued_at": PAST, "launched_at": PAST}, "launched", False),
        ({"status": "completed", "queued_at": PAST, "launched_at": PAST}, "launched", False),
        ({"status": "failed", "queued_at": PAST, "launched_at": PAST}, "launched", False),
        ({"status": "failed", "queued_at": PAST}, "launch_failed", False),
        ({"status": "cancelled", "queued_at": PAST}, "not_queued", False),
        ({"status": "cancelled", "queued_at": PAST, "launched_at": PAST}, "launched", False),
    ],
)
def test_queue_status_and_readiness(fields: dict, queue_status: str, ready: bool) -> None:
    job = make_job(**fields)
    assert job.queue_status == queue_status
    assert job.is_ready_to_launch is ready
    assert job.is_queued is (fields["status"] in ("queued", "retrying"))


def test_ready_queryset_matches_property_and_orders_priority_then_fifo() -> None:
    base = timezone.now() - timedelta(minutes=10)
    jobs = [
        make_job(status="queued", priority=p, queued_at=base + timedelta(seconds=i))
        for i, p in enumerate([20, 80, 50, 80, 20])
    ]
    make_job(status="queued", priority=100, queued_at=base, scheduled_for=FUTURE)
    make_job(status="pending", priority=100)
    ordered = list(ContainerJob.objects.ready())
    assert ordered == [jobs[1], jobs[3], jobs[2], jobs[0], jobs[4]]
    assert all(job.is_ready_to_launch for job in ordered)


def test_duration() -> None:
    job = make_job()
    assert job.duration is None
    job.started_at = NOW
    assert job.duration is None
    job.completed_at = NOW + timedelta(seconds=90)
    assert job.duration == timedelta(seconds=90)


def test_mark_helpers_walk_the_happy_path() -> None:
    job = make_job()
    job.mark_as_queued()
    assert job.status == Status.QUEUED and job.queued_at is not None
    job.transition_to(Status.LAUNCHING)
    job.mark_as_running()
    assert job.started_at is not None and job.launched_at is not None
    job.mark_as_completed()
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.COMPLETED and row.completed_at is not None
    assert row.queue_status == "launched"


def test_mark_as_failed_retries_within_budget_then_fails() -> None:
    job = make_job(status="running", max_retries=2, retry_strategy="default")
    before = timezone.now()
    job.mark_as_failed(should_retry=True, error="connection refused")
    assert job.status == Status.RETRYING and job.retry_count == 1
    assert job.scheduled_for is not None and job.scheduled_for > before
    assert job.last_error == "connection refused" and job.last_error_at is not None
    job.transition_to(Status.LAUNCHING)
    job.mark_as_failed(should_retry=True, error="again")
    assert job.status == Status.RETRYING and job.retry_count == 2
    job.transition_to(Status.LAUNCHING)
    job.mark_as_failed(should_retry=True, error="third")
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.retry_count, row.last_error) == (Status.FAILED, 2, "third")
    assert row.queue_status == "launch_failed"


def test_mark_as_failed_without_retry_fails_at_once() -> None:
    job = make_job(status="launching", max_retries=5)
    job.mark_as_failed(should_retry=False, error="image not found")
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.retry_count) == (Status.FAILED, 0)


def test_wait_raises_builtin_timeout_error() -> None:
    job = make_job(status="queued")
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.3, poll_interval=0.1)


def test_wait_returns_when_final() -> None:
    job = make_job(status="running")
    ContainerJob.objects.filter(pk=job.pk).update(status="completed", exit_code=0)
    assert job.wait(timeout=5).exit_code == 0


def test_container_name_is_deterministic() -> None:
    job = make_job(attempt=3)
    assert job.container_name == f"dcc-{job.pk}-a3" == container_name(job.pk, 3)


def test_database_rejects_out_of_range_priority() -> None:
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        make_job(priority=101)
    assert not ContainerJob.objects.exists()
