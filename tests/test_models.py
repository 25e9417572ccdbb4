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


# -- save() never puts back the engine's state ------------------------------------------


def claimed_job(**fields: object) -> tuple[ContainerJob, ContainerJob]:
    """A queued job read by an operator (the stale instance), then claimed by a worker;
    returns (stale, claimant)."""
    from django_container_celery import claims

    job = make_job(**fields)
    job.mark_as_queued()
    stale = ContainerJob.objects.get(pk=job.pk)
    claimant = claims.claim_job(job.pk, "worker-1")
    assert claimant is not None and claimant.status == Status.LAUNCHING
    return stale, claimant


def test_engine_fields_are_everything_but_definition_and_record() -> None:
    engine = set(ContainerJob.engine_fields())
    owned = {
        "status",
        "queued_at",
        "scheduled_for",
        "launched_at",
        "retry_count",
        "last_error",
        "last_error_at",
        "claimed_by",
        "claimed_at",
        "lease_expires_at",
        "attempt",
        "assigned_host",
        "dispatched_at",
        "execution_id",
        "exit_code",
        "started_at",
        "completed_at",
        "stdout_log",
        "stderr_log",
        "celery_task_id",
        "stop_pending",
    }
    assert owned <= engine
    assert not engine & {*ContainerJob.DEFINITION_FIELDS, *ContainerJob.RECORD_FIELDS}
    assert not engine & {"id", "created_at"}


def test_stale_save_after_a_claim_keeps_the_claim() -> None:
    stale, claimant = claimed_job(description="before")
    stale.description = "edited by an operator"
    stale.save()
    row = ContainerJob.objects.get(pk=stale.pk)
    assert row.description == "edited by an operator"
    assert (row.status, row.claimed_by, row.attempt) == (Status.LAUNCHING, "worker-1", 1)
    assert (row.claimed_at, row.lease_expires_at) == (
        claimant.claimed_at,
        claimant.lease_expires_at,
    )
    # The stale instance now shows the claim instead of its old state.
    assert (stale.status, stale.claimed_by, stale.attempt) == (Status.LAUNCHING, "worker-1", 1)
    assert stale.container_name == claimant.container_name


def test_next_claim_after_a_stale_save_takes_a_new_container_name() -> None:
    from django_container_celery import claims

    stale, claimant = claimed_job()
    first_name = claimant.container_name
    stale.name = "renamed"
    stale.save()
    claims.release(claimant)
    again = claims.claim_job(stale.pk, "worker-2")
    assert again is not None and again.attempt == 2
    assert again.container_name != first_name


def test_stale_save_of_a_running_job_keeps_its_execution() -> None:
    stale, claimant = claimed_job(priority=50)
    claimant.mark_as_running(as_claimant=True, execution_id="container-1")
    stale.priority = 90
    stale.save()
    row = ContainerJob.objects.get(pk=stale.pk)
    assert row.priority == 90
    assert (row.status, row.execution_id, row.claimed_by, row.attempt) == (
        Status.RUNNING,
        "container-1",
        "worker-1",
        1,
    )
    assert row.started_at == claimant.started_at and row.launched_at == claimant.launched_at
    assert row.lease_expires_at == claimant.lease_expires_at
    assert stale.execution_id == "container-1" and stale.status == Status.RUNNING


def test_claimant_instance_saves_its_definition_after_its_own_writes() -> None:
    _stale, claimant = claimed_job()
    claimant.mark_as_running(as_claimant=True, execution_id="container-1")
    claimant.description = "noted while running"
    claimant.save()
    row = ContainerJob.objects.get(pk=claimant.pk)
    assert (row.description, row.status, row.execution_id) == (
        "noted while running",
        Status.RUNNING,
        "container-1",
    )


def test_stale_instance_cannot_move_the_status_of_a_claimed_job() -> None:
    from django_container_celery.exceptions import TransitionConflict

    stale, _claimant = claimed_job()
    stale.status = Status.CANCELLED  # launching -> cancelled is an edge, but not by save()
    stale.description = "not saved either"
    with pytest.raises(TransitionConflict, match="worker-1"):
        stale.save()
    row = ContainerJob.objects.get(pk=stale.pk)
    assert (row.status, row.claimed_by, row.description) == (Status.LAUNCHING, "worker-1", "")


def test_status_move_refused_when_the_row_moved_since_it_was_read() -> None:
    from django_container_celery.exceptions import TransitionConflict

    job = make_job()
    job.mark_as_queued()
    stale = ContainerJob.objects.get(pk=job.pk)
    job.transition_to(Status.PENDING)  # dequeued by someone else
    stale.status = Status.CANCELLED  # pending -> cancelled is an edge, but from 'queued'
    with pytest.raises(TransitionConflict, match="moved from 'queued'"):
        stale.save()
    assert ContainerJob.objects.get(pk=job.pk).status == Status.PENDING


@pytest.mark.parametrize("field", ["attempt", "claimed_by", "lease_expires_at"])
def test_changing_an_owned_field_of_a_held_job_is_refused(field: str) -> None:
    from django_container_celery.exceptions import OwnedFieldError

    _stale, claimant = claimed_job()
    job = ContainerJob.objects.get(pk=claimant.pk)
    setattr(job, field, {"attempt": 0, "claimed_by": "", "lease_expires_at": None}[field])
    job.description = "not saved either"
    with pytest.raises(OwnedFieldError, match=field) as info:
        job.save()
    assert info.value.fields == (field,) and "worker-1" in str(info.value)
    with pytest.raises(OwnedFieldError, match=field):
        job.save(update_fields=[field])
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.attempt, row.claimed_by, row.description) == (1, "worker-1", "")
    assert row.lease_expires_at == claimant.lease_expires_at


def test_update_fields_naming_an_owned_field_is_refused_while_running() -> None:
    from django_container_celery.exceptions import OwnedFieldError

    # Running without a claimant: a container may still be live, so it counts as held.
    job = make_job(status="running", execution_id="container-1")
    job.execution_id = ""
    with pytest.raises(OwnedFieldError, match=r"execution_id.*the job is running"):
        job.save(update_fields=["execution_id"])
    assert ContainerJob.objects.get(pk=job.pk).execution_id == "container-1"


def test_owned_fields_of_a_job_no_worker_holds_are_saved() -> None:
    job = make_job(status="failed", last_error="boom", retry_count=2)
    job.last_error = ""
    job.save()
    job.retry_count = 0
    job.save(update_fields=["retry_count"])
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.last_error, row.retry_count) == ("", 0)


def test_plain_save_writes_no_engine_field_it_did_not_change() -> None:
    job = make_job(status="failed", last_error="boom")
    stale = ContainerJob.objects.get(pk=job.pk)
    ContainerJob.objects.filter(pk=job.pk).update(last_error="newer", retry_count=1)
    stale.name = "renamed"
    stale.save()
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.name, row.last_error, row.retry_count) == ("renamed", "newer", 1)
    assert (stale.last_error, stale.retry_count) == ("newer", 1)
