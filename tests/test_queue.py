"""The queue engine with the in-memory executor: fast, no Docker, real PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from django_container_celery.executors.memory import FakeRun, MemoryExecutor
from django_container_celery.installation import installation_id
from django_container_celery.launching import launch_claimed
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

pytestmark = pytest.mark.django_db


def queued(priority: int = 50, **fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    job = ContainerJob.objects.create(priority=priority, **fields)
    job.mark_as_queued(scheduled_for=fields.get("scheduled_for"))
    return job


def expire_lease(job: ContainerJob, owner: str = "dead-worker") -> None:
    ContainerJob.objects.filter(pk=job.pk).update(
        claimed_by=owner, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


# -- queueing ------------------------------------------------------------------------


def test_queue_job_sets_queue_fields(qm: JobQueueManager) -> None:
    job = ContainerJob.objects.create(docker_image="busybox")
    later = timezone.now() + timedelta(minutes=5)
    qm.queue_job(job, schedule_for=later, priority=90)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.priority, row.scheduled_for) == (Status.QUEUED, 90, later)
    assert row.queued_at is not None and row.queue_status == "scheduled"


@pytest.mark.parametrize("status", ["queued", "retrying", "completed", "cancelled"])
def test_queue_job_refuses(qm: JobQueueManager, status: str) -> None:
    job = ContainerJob.objects.create(docker_image="busybox", status=status)
    with pytest.raises(ValueError):
        qm.queue_job(job)
    assert ContainerJob.objects.get(pk=job.pk).status == status


def test_queue_job_rejects_bad_priority(qm: JobQueueManager) -> None:
    from django.core.exceptions import ValidationError

    job = ContainerJob.objects.create(docker_image="busybox")
    with pytest.raises(ValidationError):
        qm.queue_job(job, priority=101)
    assert ContainerJob.objects.get(pk=job.pk).status == Status.PENDING


def test_dequeue_then_queue_again(qm: JobQueueManager) -> None:
    job = queued(scheduled_for=timezone.now() + timedelta(hours=1))
    qm.dequeue_job(job)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.queued_at, row.scheduled_for) == (Status.PENDING, None, None)
    assert row.queue_status == "not_queued"
    qm.queue_job(row)
    assert ContainerJob.objects.get(pk=job.pk).status == Status.QUEUED


def test_get_ready_jobs_order_limit_exclude(qm: JobQueueManager) -> None:
    low, high1, mid, high2 = queued(20), queued(80), queued(50), queued(80)
    queued(99, scheduled_for=timezone.now() + timedelta(hours=1))
    assert list(qm.get_ready_jobs()) == [high1, high2, mid, low]
    assert list(qm.get_ready_jobs(limit=2)) == [high1, high2]
    assert list(qm.get_ready_jobs(exclude_ids=[high1.pk])) == [high2, mid, low]


# -- claiming and launching -----------------------------------------------------------


def test_acquire_claims_best_job_with_lease(qm: JobQueueManager) -> None:
    queued(20)
    best = queued(80)
    job = qm.acquire_next_job()
    assert job is not None and job.pk == best.pk
    row = ContainerJob.objects.get(pk=best.pk)
    assert (row.status, row.claimed_by, row.attempt) == (Status.LAUNCHING, "test-worker", 1)
    assert row.lease_expires_at is not None and row.lease_expires_at > timezone.now()


def test_acquire_returns_none_when_empty_or_full(qm: JobQueueManager) -> None:
    assert qm.acquire_next_job() is None
    queued()
    queued()
    assert qm.acquire_next_job(max_concurrent=1) is not None
    assert qm.acquire_next_job(max_concurrent=1) is None


def test_launch_job_starts_named_labelled_container(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    job = queued(command="sh -c 'echo a b'", environment={"A": "1"}, memory_limit=64)
    result = qm.launch_job(job)
    assert result == {"success": True, "error": None}
    spec = mem.started[-1]
    assert spec.name == f"dcc-{job.pk}-a1"
    assert spec.labels == {
        "dcc.job_id": str(job.pk),
        "dcc.attempt": "1",
        "dcc.installation": installation_id(),
    }
    assert spec.command == ["sh", "-c", "echo a b"]
    assert spec.memory_mb == 64 and spec.environment == {"A": "1"}
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.RUNNING and row.execution_id
    assert row.launched_at is not None and row.queue_status == "launched"


def test_transient_failures_back_off_then_fail(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.start_error = requests.exceptions.ConnectionError("Connection refused")
    job = queued(max_retries=3)
    delays = []
    for expected_count in (1, 2, 3):
        result = qm.launch_job_with_retry(job)
        job.refresh_from_db()
        assert result["success"] is False and result["retry_scheduled"] is True
        assert job.status == Status.RETRYING and job.retry_count == expected_count
        assert "Connection refused" in job.last_error and job.last_error_at
        assert job.queue_status == "scheduled"
        delays.append(result["retry_in_seconds"])
        ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=timezone.now())
        job.refresh_from_db()
    assert delays[0] < delays[1] < delays[2]
    result = qm.launch_job_with_retry(job)
    job.refresh_from_db()
    assert result["retry_scheduled"] is False
    assert (job.status, job.retry_count, job.queue_status) == (Status.FAILED, 3, "launch_failed")
    assert "Connection refused" in job.last_error
    assert mem.started == []


def test_permanent_failure_fails_at_once(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    import docker.errors

    mem.start_error = docker.errors.ImageNotFound("No such image: nope:latest")
    job = queued(max_retries=5)
    result = qm.launch_job_with_retry(job)
    job.refresh_from_db()
    assert result["success"] is False and result["retry_scheduled"] is False
    assert (job.status, job.retry_count) == (Status.FAILED, 0)
    assert "No such image" in job.last_error and "permanent" in job.last_error


def test_retry_attempt_numbers_increase(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(exit_code=75)
    job = queued(retry_exit_codes=[75], max_retries=1)
    qm.launch_job(job)
    qm.harvest_finished_jobs()
    job.refresh_from_db()
    assert job.status == Status.RETRYING and job.retry_count == 1
    ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=timezone.now())
    qm.launch_job(job)
    qm.harvest_finished_jobs()
    job.refresh_from_db()
    assert [s.name for s in mem.started] == [f"dcc-{job.pk}-a1", f"dcc-{job.pk}-a2"]
    assert (job.status, job.exit_code, job.attempt) == (Status.FAILED, 75, 2)


# -- harvesting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "retry_codes", "status"),
    [(0, [], "completed"), (3, [], "failed"), (3, [3], "retrying"), (3, [4], "failed")],
)
def test_harvest_by_exit_code(
    qm: JobQueueManager, mem: MemoryExecutor, exit_code: int, retry_codes: list, status: str
) -> None:
    mem.behaviour = lambda spec: FakeRun(exit_code=exit_code, stdout="out\n", stderr="err\n")
    job = queued(retry_exit_codes=retry_codes)
    assert qm.launch_job(job)["success"]
    assert qm.harvest_finished_jobs() == 1
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.exit_code) == (status, exit_code)
    assert (row.stdout_log, row.stderr_log) == ("out\n", "err\n")
    assert row.claimed_by == "" and mem.inspect(job.container_name) is None  # removed
    if status != "completed":
        assert f"code {exit_code}" in row.last_error


def test_harvest_leaves_running_jobs(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued()
    qm.launch_job(job)
    assert qm.harvest_finished_jobs() == 0
    assert ContainerJob.objects.get(pk=job.pk).status == Status.RUNNING


def test_timeout_kills_and_fails(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(timeout_seconds=1)
    qm.launch_job(job)
    time.sleep(1.1)
    assert qm.harvest_finished_jobs() == 1
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.FAILED and "timed out after 1 seconds" in row.last_error
    assert mem.running_names() == []


def test_cancel_running_job_stops_container(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued()
    qm.launch_job(job)
    assert mem.running_names() == [job.container_name]
    job.refresh_from_db()
    assert qm.cancel_job(job) is True
    assert mem.running_names() == []
    assert ContainerJob.objects.get(pk=job.pk).status == Status.CANCELLED
    assert qm.harvest_finished_jobs() == 0  # nothing left to finish
    assert qm.cancel_job(job) is False


# -- batches and capacity -----------------------------------------------------------------


def test_launch_next_batch_respects_limit_and_survives_bad_jobs(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    bad = queued(priority=90, bind_mounts=["/etc:/x"])  # saved before the allow-list check
    good = [queued() for _ in range(4)]
    result = qm.launch_next_batch(max_concurrent=3)
    assert result["launched"] == 3
    assert len(result["errors"]) == 1 and str(bad.pk) in result["errors"][0]
    assert ContainerJob.objects.get(pk=bad.pk).status == Status.FAILED
    running = set(ContainerJob.objects.filter(status="running").values_list("pk", flat=True))
    assert running == {job.pk for job in good[:3]}
    assert qm.launch_next_batch(max_concurrent=3)["launched"] == 0


def test_per_host_capacity_and_placement(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    small = ExecutorHost.objects.create(name="small", max_concurrent_jobs=1)
    ExecutorHost.objects.create(
        name="big", max_concurrent_jobs=2, connection_string="tcp://127.0.0.1:1"
    )
    pinned = [queued(priority=90, docker_host=small) for _ in range(2)]
    [queued() for _ in range(4)]
    result = qm.launch_next_batch(max_concurrent=10)
    assert result["launched"] == 3
    per_host = dict(
        ContainerJob.objects.filter(status="running")
        .values_list("assigned_host__name")
        .annotate(n=__import__("django.db.models", fromlist=["Count"]).Count("pk"))
    )
    assert per_host == {"small": 1, "big": 2}
    assert ContainerJob.objects.get(pk=pinned[0].pk).status == Status.RUNNING
    assert ContainerJob.objects.get(pk=pinned[1].pk).status == Status.QUEUED


def test_a_message_starts_the_best_waiting_job_not_its_own(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    low = queued(10)
    high = queued(90)
    with override_settings(
        CONTAINER_CELERY={**settings.CONTAINER_CELERY, "MAX_CONCURRENT_JOBS": 1}
    ):
        started, _ = qm.run_job(low.pk)  # the low job's message arrives first
        assert started is not None and started.pk == high.pk
        assert qm.run_job(high.pk) == (None, None)  # no free slot: nothing, harmlessly
    assert [spec.labels["dcc.job_id"] for spec in mem.started] == [str(high.pk)]
    assert ContainerJob.objects.get(pk=low.pk).status == Status.QUEUED


def test_exactly_this_job_when_asked(qm: JobQueueManager) -> None:
    from django_container_celery import claims

    low = queued(10)
    queued(90)
    claimed = claims.claim_job(low.pk, "w", max_concurrent=1)
    assert claimed is not None and claimed.pk == low.pk
    assert claims.claim_job(low.pk, "w", max_concurrent=1) is None  # not waiting any more


def test_a_message_stays_on_its_route_with_per_host_queues(qm: JobQueueManager) -> None:
    a = ExecutorHost.objects.create(name="a", max_concurrent_jobs=5)
    b = ExecutorHost.objects.create(name="b", max_concurrent_jobs=5)
    on_a = queued(10, docker_host=a)
    on_b = queued(90, docker_host=b)
    unpinned = queued(80)
    routed = {**settings.CONTAINER_CELERY, "PER_HOST_QUEUES": True}
    with override_settings(CONTAINER_CELERY=routed):
        started, _ = qm.run_job(on_a.pk)  # consumed from queue dcc.a
        assert started is not None and started.pk == on_a.pk
        started, _ = qm.run_job(unpinned.pk)  # the shared queue: unpinned jobs only
        assert started is not None and started.pk == unpinned.pk
    started, _ = qm.run_job(on_a.pk)  # one queue for all: the best job anywhere
    assert started is not None and started.pk == on_b.pk


def test_a_message_for_a_deleted_job_claims_nothing_with_per_host_queues(
    qm: JobQueueManager,
) -> None:
    a = ExecutorHost.objects.create(name="a", max_concurrent_jobs=5)
    gone = queued(10, docker_host=a)
    queued(90)  # unpinned: served by the shared queue, not by host a's
    gone_id = gone.pk
    gone.delete()
    routed = {**settings.CONTAINER_CELERY, "PER_HOST_QUEUES": True}
    with override_settings(CONTAINER_CELERY=routed):
        assert qm.run_job(gone_id) == (None, None)


def test_a_job_queued_without_a_message_gets_its_task_id_when_claimed(
    qm: JobQueueManager,
) -> None:
    job = queued()
    assert job.celery_task_id == ""
    started, _ = qm.run_job(job.pk)
    assert started is not None and started.celery_task_id
    assert ContainerJob.objects.get(pk=job.pk).celery_task_id == started.celery_task_id


def test_duplicate_run_is_harmless(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    job = queued()
    first = qm.run_job(job.pk)
    second = qm.run_job(job.pk)
    assert first[0] is not None and second == (None, None)
    assert len(mem.started) == 1
    # The run is detached: the reconcile pass (or a watcher) records the exit.
    assert ContainerJob.objects.get(pk=job.pk).status == Status.RUNNING
    assert qm.harvest_finished_jobs() == 1
    assert ContainerJob.objects.get(pk=job.pk).status == Status.COMPLETED


# -- rescue --------------------------------------------------------------------------------


def _launched(qm: JobQueueManager, **fields: Any) -> ContainerJob:
    job = queued(**fields)
    assert qm.launch_job(job)["success"]
    job.refresh_from_db()
    return job


def test_rescue_adopts_running_container(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = _launched(qm)
    expire_lease(job)
    assert qm.rescue_stale_jobs() == 1
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.claimed_by, row.attempt) == (Status.RUNNING, "test-worker", 1)
    mem.finish(job.container_name, 0)
    assert qm.harvest_finished_jobs() == 1
    assert ContainerJob.objects.get(pk=job.pk).status == Status.COMPLETED
    assert len(mem.started) == 1


def test_rescue_harvests_exited_container(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = _launched(qm)
    mem.finish(job.container_name, 0)
    expire_lease(job)
    qm.rescue_stale_jobs()
    assert ContainerJob.objects.get(pk=job.pk).status == Status.COMPLETED


def test_rescue_retries_vanished_container(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = _launched(qm)
    mem.vanish(job.container_name)
    expire_lease(job)
    qm.rescue_stale_jobs()
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.RETRYING and "vanished" in row.last_error


def test_rescue_continues_the_same_attempt_of_a_claim_that_never_started(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    # The same attempt, so the same container name: had the first launcher been merely
    # slow, the daemon would refuse its container or ours, never run both.
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    queued()
    job = qm.acquire_next_job(worker_id="dead-worker")
    assert job is not None
    expire_lease(job)
    qm.rescue_stale_jobs()
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.attempt) == (Status.RUNNING, 1)
    assert [s.name for s in mem.started] == [f"dcc-{job.pk}-a1"]


def test_slow_launcher_and_rescuer_share_one_container(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    queued()
    job = qm.acquire_next_job(worker_id="slow-worker")
    assert job is not None
    expire_lease(job)
    qm.rescue_stale_jobs()  # the rescuer starts attempt 1
    # The slow launcher now gets to its start: the name is taken, it records nothing and
    # leaves the container to the new owner.
    outcome = launch_claimed(job, mem)
    assert not outcome.success
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.attempt) == (Status.RUNNING, 1)
    assert row.claimed_by != "slow-worker"
    assert [s.name for s in mem.started] == [f"dcc-{job.pk}-a1"]
    state = mem.inspect(f"dcc-{job.pk}-a1")
    assert state is not None and state.running


def test_zombie_cannot_overwrite_after_takeover(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    zombie_view = _launched(qm)  # this instance is the old owner's view
    expire_lease(zombie_view, owner="test-worker")
    rescuer = JobQueueManager(executor_factory=lambda host: mem, worker_id="rescuer")
    rescuer.rescue_stale_jobs()
    from django_container_celery.finishing import finish

    mem.finish(zombie_view.container_name, 1)
    assert finish(zombie_view, mem, 1) is False
    row = ContainerJob.objects.get(pk=zombie_view.pk)
    assert (row.status, row.claimed_by, row.exit_code) == (Status.RUNNING, "rescuer", None)


# -- dispatch bookkeeping, metrics ---------------------------------------------------------


def test_due_for_dispatch_marks_once_and_resends_stale(qm: JobQueueManager) -> None:
    jobs = [queued(p) for p in (10, 90, 50)]
    chosen = qm.due_for_dispatch(max_concurrent=2)
    assert [j.pk for j in chosen] == [jobs[1].pk, jobs[2].pk]
    assert qm.due_for_dispatch(max_concurrent=2) == []
    qm.forget_dispatch(jobs[1].pk)
    assert [j.pk for j in qm.due_for_dispatch(max_concurrent=2)] == [jobs[1].pk]
    ContainerJob.objects.update(dispatched_at=timezone.now() - timedelta(hours=1))
    assert len(qm.due_for_dispatch(max_concurrent=2)) == 2


def test_metrics_and_stats(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    queued()
    queued()
    queued(scheduled_for=timezone.now() + timedelta(hours=1))
    qm.launch_job(queued(priority=99))
    ContainerJob.objects.create(docker_image="busybox", status="failed")
    metrics = qm.get_worker_metrics()
    assert metrics == {
        "queue_depth": 3,
        "ready_now": 2,
        "scheduled_future": 1,
        "running": 1,
        "launch_failed": 1,
    }
    stats = qm.get_queue_stats()
    assert stats["by_status"]["queued"] == 3 and stats["by_status"]["running"] == 1
    assert sum(stats["by_status"].values()) == 5


def test_retry_failed_job(qm: JobQueueManager) -> None:
    job = ContainerJob.objects.create(docker_image="busybox", status="failed", retry_count=3)
    qm.retry_failed_job(job)
    assert (job.status, job.retry_count) == (Status.QUEUED, 3)
    job2 = ContainerJob.objects.create(docker_image="busybox", status="failed", retry_count=3)
    qm.retry_failed_job(job2, reset_count=True)
    assert ContainerJob.objects.get(pk=job2.pk).retry_count == 0
    assert list(qm.get_failed_jobs()) == []


def test_a_launcher_that_lost_its_claim_never_starts_a_container(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    # The attempt was taken over (and may have run and been removed already) while this
    # launcher was stalled before its create: the fence between create and start holds.
    queued()
    job = qm.acquire_next_job(worker_id="stalled")
    assert job is not None
    ContainerJob.objects.filter(pk=job.pk).update(claimed_by="new-owner")
    outcome = launch_claimed(job, mem)
    assert not outcome.success
    assert mem.started == []
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.claimed_by, row.attempt) == (Status.LAUNCHING, "new-owner", 1)
