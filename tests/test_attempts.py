"""The attempt history: one JobAttempt row per ended attempt, written with the job's
transition and never without it; takeovers counted on the job. In-memory executor, real
PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import docker.errors
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_container_celery import claims
from django_container_celery.executors.memory import FakeRun, MemoryExecutor
from django_container_celery.finishing import end_attempt, finish
from django_container_celery.masking import MASK
from django_container_celery.models import AttemptReason, ContainerJob, ExecutorHost, JobAttempt
from django_container_celery.outcomes import End, Ending
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

pytestmark = pytest.mark.django_db


def queued(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    job = ContainerJob.objects.create(**fields)
    job.mark_as_queued()
    return job


def running(qm: JobQueueManager, mem: MemoryExecutor, **fields: Any) -> ContainerJob:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(**fields)
    assert qm.launch_job(job)["success"]
    job.refresh_from_db()
    return job


def expire_lease(job: ContainerJob, owner: str = "dead-worker") -> None:
    ContainerJob.objects.filter(pk=job.pk).update(
        claimed_by=owner, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


def attempts(job: ContainerJob) -> list[JobAttempt]:
    return list(JobAttempt.objects.filter(job=job).order_by("attempt", "id"))


def test_the_reasons_hold_every_ending_and_out_of_memory() -> None:
    assert {end.value for end in End} | {"out_of_memory"} == set(AttemptReason.values)


def test_a_successful_exit_writes_one_row(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    host = ExecutorHost.objects.create(name="attempt-host")
    job = running(qm, mem)
    ContainerJob.objects.filter(pk=job.pk).update(assigned_host=host)
    mem.finish(job.container_name, 0)
    assert qm.harvest_finished_jobs() == 1
    row = ContainerJob.objects.get(pk=job.pk)
    (attempt,) = attempts(job)
    assert (attempt.attempt, attempt.reason, attempt.exit_code) == (1, "exited", 0)
    assert (attempt.error, attempt.retried, attempt.host_id) == ("", False, host.pk)
    assert attempt.succeeded
    assert attempt.started_at == row.started_at and attempt.claimed_at is not None
    assert attempt.claimed_at <= attempt.started_at <= attempt.ended_at
    # Both by the database's clock, written in one transaction.
    assert row.completed_at is not None
    assert abs((attempt.ended_at - row.completed_at).total_seconds()) < 1


def test_a_retried_exit_then_a_success_write_one_row_each(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(exit_code=75)
    job = queued(retry_exit_codes=[75], max_retries=2)
    qm.launch_job(job)
    qm.harvest_finished_jobs()
    job.refresh_from_db()
    assert job.status == Status.RETRYING
    ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=timezone.now())
    mem.behaviour = lambda spec: FakeRun(exit_code=0)
    qm.launch_job(job)
    qm.harvest_finished_jobs()
    job.refresh_from_db()
    assert job.status == Status.COMPLETED
    first, second = attempts(job)
    assert (first.attempt, first.reason, first.exit_code, first.retried) == (1, "exited", 75, True)
    assert "code 75" in first.error and "retry_exit_codes" in first.error
    assert (second.attempt, second.exit_code, second.retried, second.error) == (2, 0, False, "")


def test_the_error_is_the_last_error_with_secrets_masked(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    job = running(qm, mem, environment={"API_TOKEN": "tok-s3cr3t-value"}, max_retries=0)
    assert end_attempt(job, Ending(End.VANISHED, error="gone, tok-s3cr3t-value leaked"))
    row = ContainerJob.objects.get(pk=job.pk)
    (attempt,) = attempts(job)
    assert row.status == Status.FAILED and attempt.reason == "vanished"
    assert "tok-s3cr3t-value" not in attempt.error and MASK in attempt.error
    assert attempt.error.replace(MASK, "tok-s3cr3t-value") == row.last_error
    assert attempt.exit_code is None and not attempt.retried


def test_a_timeout_writes_its_reason(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    job = running(qm, mem, timeout_seconds=1)
    time.sleep(1.1)
    assert qm.harvest_finished_jobs() == 1
    (attempt,) = attempts(job)
    assert attempt.reason == "timed_out" and "timed out" in attempt.error
    assert attempt.started_at is not None and not attempt.retried


def test_a_launch_failure_writes_its_reason(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.start_error = docker.errors.ImageNotFound("No such image: nope:latest")
    job = queued(max_retries=5)
    assert qm.launch_job_with_retry(job)["success"] is False
    (attempt,) = attempts(job)
    assert (attempt.reason, attempt.retried, attempt.started_at) == ("launch_failed", False, None)
    assert "No such image" in attempt.error and attempt.claimed_at is not None


def test_cancel_writes_a_row_only_for_an_attempt_under_way(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    waiting = queued()
    assert qm.cancel_job(waiting)
    assert attempts(waiting) == []
    job = running(qm, mem)
    assert qm.cancel_job(job)
    (attempt,) = attempts(job)
    assert (attempt.reason, attempt.attempt, attempt.error) == ("cancelled", 1, "")


def test_a_cancel_with_an_instance_older_than_the_attempt_records_the_rows_attempt(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    # Read while attempt 1 ran; by the cancel, attempt 2 runs: the row's attempt is ended.
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(retry_exit_codes=[3], max_retries=2)
    qm.launch_job(job)
    old_view = ContainerJob.objects.get(pk=job.pk)
    mem.finish(job.container_name, 3)
    qm.harvest_finished_jobs()
    ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=timezone.now())
    job.refresh_from_db()
    qm.launch_job(job)
    assert old_view.status == Status.RUNNING and old_view.attempt == 1
    assert qm.cancel_job(old_view)
    assert [(a.attempt, a.reason) for a in attempts(job)] == [(1, "exited"), (2, "cancelled")]


def test_a_transition_conflict_writes_no_row(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    zombie_view = running(qm, mem)  # the old owner's view of its claim
    expire_lease(zombie_view, owner="test-worker")
    rescuer = JobQueueManager(executor_factory=lambda host: mem, worker_id="rescuer")
    rescuer.rescue_stale_jobs()
    mem.finish(zombie_view.container_name, 1)
    assert finish(zombie_view, mem, 1) is False
    assert attempts(zombie_view) == []
    assert ContainerJob.objects.get(pk=zombie_view.pk).status == Status.RUNNING
    # The new owner ends it: exactly one row, for the one attempt.
    assert rescuer.harvest_finished_jobs() == 1
    (attempt,) = attempts(zombie_view)
    assert (attempt.attempt, attempt.exit_code) == (1, 1)


def test_a_status_moved_under_the_instance_writes_no_second_row(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    job = running(qm, mem)
    stale = ContainerJob.objects.get(pk=job.pk)
    assert qm.cancel_job(job)  # ends the attempt: its one row
    assert end_attempt(stale, Ending(End.EXITED, exit_code=0)) is False
    assert [a.reason for a in attempts(job)] == ["cancelled"]
    assert ContainerJob.objects.get(pk=job.pk).status == Status.CANCELLED


def test_take_over_counts_each_rescue(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    job = running(qm, mem)
    assert job.takeover_count == 0
    assert claims.take_over(job.pk, "live-lease") is None  # the lease is alive: no rescue
    expire_lease(job)
    taken = claims.take_over(job.pk, "rescuer-1")
    assert taken is not None and taken.takeover_count == 1
    # A second rescuer right after finds the lease renewed: nothing counted.
    assert claims.take_over(job.pk, "rescuer-2") is None
    expire_lease(job)
    assert claims.take_over(job.pk, "rescuer-3") is not None
    assert ContainerJob.objects.get(pk=job.pk).takeover_count == 2


def test_a_rescue_pass_counts_its_takeover(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    job = running(qm, mem)
    expire_lease(job)
    assert qm.rescue_stale_jobs() == 1
    assert ContainerJob.objects.get(pk=job.pk).takeover_count == 1


def test_deleting_a_job_deletes_its_history_and_a_host_leaves_it(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    host = ExecutorHost.objects.create(name="gone-host")
    job = running(qm, mem)
    ContainerJob.objects.filter(pk=job.pk).update(assigned_host=host)
    mem.finish(job.container_name, 0)
    qm.harvest_finished_jobs()
    ContainerJob.objects.filter(pk=job.pk).update(assigned_host=None)
    host.delete()
    (attempt,) = attempts(job)
    assert attempt.host_id is None
    ContainerJob.objects.filter(pk=job.pk).delete()
    assert not JobAttempt.objects.filter(pk=attempt.pk).exists()


def test_cleanup_counts_jobs_not_their_attempt_rows(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    job = running(qm, mem)
    mem.finish(job.container_name, 0)
    assert qm.harvest_finished_jobs() == 1
    ContainerJob.objects.filter(pk=job.pk).update(completed_at=timezone.now() - timedelta(days=400))
    assert len(attempts(job)) == 1
    with CaptureQueriesContext(connection) as captured:
        assert qm.cleanup_old_jobs(days=30) == 1
    assert not JobAttempt.objects.filter(job_id=job.pk).exists()
    # The cascade loads the jobs' keys, never their logs.
    assert not any('"stdout_log"' in query["sql"] for query in captured.captured_queries)


def test_a_history_that_cannot_be_written_never_keeps_a_job_running(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    job = running(qm, mem)
    table = JobAttempt._meta.db_table
    with connection.cursor() as cursor:
        # Fault injected in the database itself: every insert into the history fails.
        cursor.execute(
            "CREATE FUNCTION dcc_refuse_history() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'history refused'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER dcc_refuse_history BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION dcc_refuse_history()"
        )
    mem.finish(job.container_name, 0)
    assert qm.harvest_finished_jobs() == 1
    assert ContainerJob.objects.get(pk=job.pk).status == Status.COMPLETED
    assert attempts(job) == []
