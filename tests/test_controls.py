"""Lanes in the claim, host health, and the bound on attempts without an outcome, against
real PostgreSQL (the in-memory executor stands in for Docker where the launch does not
matter; the real-Docker and real-worker versions are in test_lanes.py, test_failover.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests
from django.core.exceptions import ValidationError
from django.utils import timezone

from django_container_celery import claims, health, lanes, placement
from django_container_celery.executors.memory import FakeRun, MemoryExecutor
from django_container_celery.models import ContainerJob, ExecutorHost, JobAttempt, Lane
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .concurrency import run_in_processes

pytestmark = pytest.mark.django_db


def queued(priority: int = 50, **fields: Any) -> ContainerJob:
    job = ContainerJob.objects.create_job(docker_image="busybox", command="true", **fields)
    ContainerJob.objects.filter(pk=job.pk).update(priority=priority)
    job.refresh_from_db()
    job.mark_as_queued()
    return job


def claimed_ids(worker: str = "w") -> list[Any]:
    taken = []
    while (job := claims.claim_next(worker)) is not None:
        taken.append(job.pk)
    return taken


# -- lanes -----------------------------------------------------------------------------


def test_a_lane_limit_holds_in_the_claim_and_other_lanes_go_on() -> None:
    Lane.objects.create(name="reports", max_concurrent_jobs=2)
    reports = [queued(priority=90, lane="reports") for _ in range(4)]
    plain = [queued(priority=10) for _ in range(2)]
    taken = claimed_ids()
    # Priority first, until the lane is full; then the next lane's jobs, not a stall.
    assert taken == [reports[0].pk, reports[1].pk, plain[0].pk, plain[1].pk]
    ContainerJob.objects.filter(pk=reports[0].pk).update(status=Status.COMPLETED)
    assert claimed_ids() == [reports[2].pk]


def test_a_paused_lane_starts_nothing_and_its_jobs_keep_their_place() -> None:
    Lane.objects.create(name="batch")
    first, second = queued(lane="batch"), queued(lane="batch")
    assert lanes.pause(["batch"], by="ops") == 1
    other = queued(priority=5)
    assert claimed_ids() == [other.pk]
    row = ContainerJob.objects.get(pk=first.pk)
    assert (row.status, row.queued_at) == (Status.QUEUED, first.queued_at)
    assert any("lane batch is paused" in line for line in placement.why_waiting(row))
    assert lanes.resume(["batch"]) == 1
    assert claimed_ids() == [first.pk, second.pk]


def test_dispatch_sends_no_more_than_a_lane_may_start() -> None:
    Lane.objects.create(name="one", max_concurrent_jobs=1)
    Lane.objects.create(name="held")
    lanes.pause(["held"])
    one = [queued(priority=80, lane="one") for _ in range(3)]
    queued(priority=90, lane="held")
    rest = [queued(priority=10) for _ in range(2)]
    assert claims.eligible_ready_ids(10) == [one[0].pk, *(job.pk for job in rest)]


def test_a_paused_lanes_big_job_reserves_no_host() -> None:
    ExecutorHost.objects.create(name="h", max_concurrent_jobs=5, memory_capacity_mb=1000)
    Lane.objects.create(name="held")
    running = queued(memory_limit=600)
    assert claimed_ids() == [running.pk]
    queued(priority=90, lane="held", memory_limit=900)  # would reserve the host if counted
    lanes.pause(["held"])
    small = queued(priority=10, memory_limit=100)
    assert claimed_ids() == [small.pk]


@pytest.mark.django_db(transaction=True)
def test_racing_claims_never_exceed_a_lane_limit() -> None:
    Lane.objects.create(name="narrow", max_concurrent_jobs=3)
    for _ in range(12):
        queued(lane="narrow")
    results = run_in_processes(_claim_all, 4)
    assert sum(results) == 3
    assert ContainerJob.objects.filter(lane="narrow", status=Status.LAUNCHING).count() == 3


def _claim_all(index: int) -> int:
    return len(claimed_ids(f"racer-{index}"))


def test_an_unknown_lane_is_refused_with_its_field() -> None:
    with pytest.raises(ValidationError) as caught:
        ContainerJob.objects.create_job(docker_image="busybox", lane="nope")
    assert "lane" in caught.value.message_dict
    with pytest.raises(ValidationError) as bad_name:
        ContainerJob.objects.create_job(docker_image="busybox", lane="no spaces")
    assert "lane" in bad_name.value.message_dict
    assert not ContainerJob.objects.exists()


# -- host health -----------------------------------------------------------------------


def test_a_host_is_unhealthy_after_failures_in_a_row_and_healthy_at_a_success(
    settings: Any,
) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "HOST_FAILURES_BEFORE_UNHEALTHY": 2}
    host = ExecutorHost.objects.create(name="h")
    refused = requests.exceptions.ConnectionError("Connection refused")
    health.record(host.pk, refused)
    host.refresh_from_db()
    assert (host.failures_in_row, host.unhealthy_since) == (1, None)
    assert host.unreachable_since is not None
    health.record(host.pk, refused)
    host.refresh_from_db()
    assert host.unhealthy_since is not None and "refused" in host.health_error
    assert health.describe(host).startswith("unhealthy since")
    health.record(host.pk, None)
    host.refresh_from_db()
    assert (host.failures_in_row, host.unhealthy_since, host.health_error) == (0, None, "")


def test_an_answered_error_says_nothing_about_the_host() -> None:
    import docker.errors

    from django_container_celery.exceptions import ExecutorError

    answered = ExecutorError("no such image", docker.errors.ImageNotFound("no such image"))
    lost = ExecutorError("cannot connect", requests.exceptions.ConnectionError("refused"))
    assert not health.daemon_did_not_answer(answered)
    assert health.daemon_did_not_answer(lost)


def test_unpinned_jobs_go_to_healthy_hosts_and_pinned_ones_wait() -> None:
    sick = ExecutorHost.objects.create(name="sick", weight=1000, unhealthy_since=timezone.now())
    well = ExecutorHost.objects.create(name="well", weight=1)
    pinned = queued(priority=90, docker_host=sick)
    free = [queued() for _ in range(2)]
    assert claimed_ids() == [job.pk for job in free]
    assert set(
        ContainerJob.objects.filter(status=Status.LAUNCHING).values_list("assigned_host", flat=True)
    ) == {well.pk}
    assert ContainerJob.objects.get(pk=pinned.pk).status == Status.QUEUED
    assert claims.eligible_ready_ids(10) == []
    reasons = placement.why_waiting(ContainerJob.objects.get(pk=pinned.pk))
    assert any("unhealthy since" in line for line in reasons)
    ExecutorHost.objects.filter(pk=sick.pk).update(unhealthy_since=None)
    assert claimed_ids() == [pinned.pk]


def test_a_launch_the_daemon_does_not_answer_counts_against_its_host(
    qm: JobQueueManager, mem: MemoryExecutor, settings: Any
) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "HOST_FAILURES_BEFORE_UNHEALTHY": 2}
    host = ExecutorHost.objects.create(name="h")
    mem.start_error = requests.exceptions.ConnectionError("Connection refused")
    for _ in range(2):
        job = queued()
        qm.launch_job(job)
    host.refresh_from_db()
    assert host.failures_in_row == 2 and host.unhealthy_since is not None
    ExecutorHost.objects.filter(pk=host.pk).update(unhealthy_since=None)
    mem.start_error = None
    job = queued()
    assert qm.launch_job(job)["success"]
    host.refresh_from_db()
    assert (host.failures_in_row, host.unhealthy_since) == (0, None)


# -- attempts without an outcome -------------------------------------------------------


def test_a_job_whose_container_keeps_vanishing_is_stopped_and_needs_attention(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(max_retries=10)
    for attempt in (1, 2, 3):
        ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=None)
        assert qm.launch_job(ContainerJob.objects.get(pk=job.pk))["success"]
        mem.vanish(f"dcc-{job.pk}-a{attempt}")
        ContainerJob.objects.filter(pk=job.pk).update(
            claimed_by="dead", lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        qm.rescue_stale_jobs()
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.FAILED and row.needs_attention
    assert row.attempts_without_outcome == 3 and row.retry_count == 2
    assert "3 attempts ended without an outcome" in row.last_error
    reasons = list(JobAttempt.objects.filter(job=job).values_list("reason", flat=True))
    assert reasons == ["vanished"] * 3
    qm.retry_failed_job(row)
    row.refresh_from_db()
    assert (row.status, row.needs_attention, row.attempts_without_outcome) == (
        Status.QUEUED,
        False,
        0,
    )


def test_per_host_queues_leave_an_unhealthy_hosts_jobs_waiting(settings: Any) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "PER_HOST_QUEUES": True}
    sick = ExecutorHost.objects.create(name="sick", unhealthy_since=timezone.now())
    well = ExecutorHost.objects.create(name="well")
    pinned = queued(priority=90, docker_host=sick)
    unpinned = queued()
    # A message on the sick host's queue claims nothing; one on the shared queue takes the
    # unpinned job, to the healthy host.
    assert claims.claim_next("w", route_of=pinned.pk) is None
    job = claims.claim_next("w", route_of=unpinned.pk)
    assert job is not None and (job.pk, job.assigned_host_id) == (unpinned.pk, well.pk)
    ExecutorHost.objects.filter(pk=sick.pk).update(unhealthy_since=None)
    job = claims.claim_next("w", route_of=pinned.pk)
    assert job is not None and job.pk == pinned.pk


def test_queueing_a_failed_job_again_clears_its_attention_mark(qm: JobQueueManager) -> None:
    job = queued()
    ContainerJob.objects.filter(pk=job.pk).update(
        status=Status.FAILED, needs_attention=True, attempts_without_outcome=3
    )
    job.refresh_from_db()
    qm.queue_job(job)
    job.refresh_from_db()
    assert (job.status, job.needs_attention, job.attempts_without_outcome) == (
        Status.QUEUED,
        False,
        0,
    )


def test_a_stale_instance_does_not_put_back_a_raised_memory_limit() -> None:
    job = queued(memory_limit=16)
    stale = ContainerJob.objects.get(pk=job.pk)
    # What an out-of-memory retry writes in its transition.
    ContainerJob.objects.filter(pk=job.pk).update(memory_limit=32)
    stale.description = "edited"
    stale.save()
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.memory_limit, row.description, stale.memory_limit) == (32, "edited", 32)
    stale.memory_limit = 64  # a change made on the instance is written
    stale.save()
    assert ContainerJob.objects.get(pk=job.pk).memory_limit == 64


def test_a_lane_with_one_place_reserves_one_host() -> None:
    for name in ("a", "b"):
        ExecutorHost.objects.create(name=name, max_concurrent_jobs=5, memory_capacity_mb=1000)
    Lane.objects.create(name="one", max_concurrent_jobs=1)
    fillers = [queued(priority=99, memory_limit=600) for _ in range(2)]
    assert claimed_ids() == [job.pk for job in fillers]
    # Both would reserve a host each; the lane lets only one of them start.
    queued(priority=90, lane="one", memory_limit=900)
    queued(priority=90, lane="one", memory_limit=900)
    small = queued(priority=10, memory_limit=100)
    assert claimed_ids() == [small.pk]


def test_why_waiting_says_unhealthy_not_full() -> None:
    sick = ExecutorHost.objects.create(name="sick", unhealthy_since=timezone.now())
    pinned = queued(docker_host=sick)
    lines = placement.why_waiting(pinned)
    assert any("unhealthy since" in line for line in lines)
    assert not any("full" in line for line in lines), lines


def test_a_memory_limit_change_rolled_back_is_written_by_the_next_save() -> None:
    from django.db import transaction

    job = queued(memory_limit=100)
    job.memory_limit = 150
    with pytest.raises(RuntimeError), transaction.atomic():
        job.save()
        raise RuntimeError("the caller's transaction fails after the save")
    assert ContainerJob.objects.get(pk=job.pk).memory_limit == 100
    job.description = "again"
    job.save()
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.memory_limit, job.memory_limit) == (150, 150)
