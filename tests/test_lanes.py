"""Lanes: a lane's limit and its pause hold under racing Celery workers (PostgreSQL, Redis,
Docker, real worker processes and beat), counted from the daemon's own container events;
and a job naming a lane that does not exist is refused before anything is saved."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction

from django_container_celery import container_task, lanes
from django_container_celery.models import ContainerJob, Lane
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .celery_support import celery_cluster, wait_for, wait_running
from .docker_events import ContainerEvents

# Seconds the test waits with a lane paused after its running jobs ended: several of the
# tests' dispatch intervals (DISPATCH_INTERVAL is 1 s), so beat and the watchers get many
# chances to start a job they must not start.
PAUSED_WAIT = 6


def create(made: list[ContainerJob], image: str, command: str, **fields: Any) -> ContainerJob:
    fields.setdefault("max_retries", 0)
    job = ContainerJob.objects.create_job(docker_image=image, command=command, **fields)
    made.append(job)
    return job


def rows(jobs: list[ContainerJob]) -> list[ContainerJob]:
    """Fresh copies of the jobs' rows, in the order given."""
    by_pk = ContainerJob.objects.in_bulk([job.pk for job in jobs])
    return [by_pk[job.pk] for job in jobs]


def statuses(jobs: list[ContainerJob]) -> list[str]:
    return [str(row.status) for row in rows(jobs)]


def count_completed(jobs: list[ContainerJob]) -> int:
    return sum(status == Status.COMPLETED for status in statuses(jobs))


def claim_order(jobs: list[ContainerJob]) -> list[str]:
    """The order the claim promises: priority, then the time each job was queued."""
    queued = ContainerJob.objects.filter(pk__in=[job.pk for job in jobs])
    return [
        str(pk)
        for pk in queued.order_by("-priority", "queued_at", "id").values_list("pk", flat=True)
    ]


def labelled(jobs: list[ContainerJob], order: list[str]) -> list[str]:
    names = {str(job.pk): f"{job.priority}:{job.name}" for job in jobs}
    return [names[job_id] for job_id in order]


# -- a lane's limit under racing workers -------------------------------------------------


@pytest.mark.celery
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_three_racing_workers_hold_each_lanes_limit(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    limits = {"limited_1": 1, "limited_2": 2}
    for name, limit in limits.items():
        Lane.objects.create(name=name, max_concurrent_jobs=limit)
    # Interleaved, so that both lanes' jobs wait side by side in one queue.
    by_lane: dict[str, list[ContainerJob]] = {name: [] for name in limits}
    for n in range(15):
        for name in limits:
            job = create(made, test_image, "sh -c 'sleep 1'", lane=name, name=f"{name}-{n}")
            by_lane[name].append(job)
    events = ContainerEvents(docker_client)
    # A global limit well above both lanes' together: only the lanes' limits may bind.
    with celery_cluster(broker_url, MAX_CONCURRENT_JOBS=10) as cluster:
        for worker in ("r1", "r2", "r3"):
            cluster.worker(worker, concurrency=2)
        cluster.beat()
        with transaction.atomic():
            for job in made:
                job.delay()
        wait_for(
            lambda: count_completed(made) == len(made),
            240,
            interval=0.5,
            message=f"not all completed: {statuses(made)}",
        )
    most = events.most_running_at_once_by(by_lane)
    containers = events.per_job(made)
    completed = count_completed(made)
    print(
        f"lanes: limited_1_max_running={most['limited_1']} "
        f"limited_2_max_running={most['limited_2']} containers={sum(containers.values())} "
        f"jobs_completed={completed}"
    )
    # Exactly the limit: never above it, and reached, so the lane's limit is what bound.
    assert most == limits
    assert set(containers.values()) == {1}, containers
    assert completed == 30
    assert [row.attempt for row in rows(made)] == [1] * 30


# -- pausing a lane ----------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_a_paused_lane_starts_nothing_and_resumed_runs_by_priority(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    Lane.objects.create(name="reports", max_concurrent_jobs=2)
    events = ContainerEvents(docker_client)
    with celery_cluster(broker_url, MAX_CONCURRENT_JOBS=10) as cluster:
        cluster.worker("w1", concurrency=2)
        cluster.worker("w2", concurrency=2)
        cluster.beat()
        runners = [
            create(made, test_image, "sh -c 'sleep 4'", lane="reports", name=f"runner-{n}")
            for n in range(2)
        ]
        for job in runners:
            job.delay()
        for job in runners:
            wait_running(job)
        # Paused while its two jobs run (each for 4 s), before anything else is queued.
        assert lanes.pause(["reports"], by="test") == 1
        assert statuses(runners) == [Status.RUNNING] * 2, "a runner ended before the pause"
        # Ten more of the lane, distinct priorities queued in no order: the lane is paused,
        # so they wait.
        priorities = [30, 70, 10, 90, 50, 20, 80, 40, 60, 0]
        waiters = [
            create(made, test_image, "sh -c 'sleep 0.2'", lane="reports", name=f"w{p}", priority=p)
            for p in priorities
        ]
        with transaction.atomic():
            for job in waiters:
                job.delay()
        queued_at = {row.pk: row.queued_at for row in rows(waiters)}
        assert events.started(waiters) == []
        assert statuses(waiters) == [Status.QUEUED] * 10

        # The running jobs finish; a job outside the lane still runs meanwhile.
        other = create(made, test_image, "sh -c 'sleep 0.2'", name="no-lane")
        other.delay()
        wait_for(
            lambda: statuses(runners) == [Status.COMPLETED] * 2,
            60,
            message=f"the running jobs of the paused lane did not finish: {statuses(runners)}",
        )
        wait_for(lambda: statuses([other]) == [Status.COMPLETED], 60, message="no-lane job")
        time.sleep(PAUSED_WAIT)
        started_while_paused = len(events.started(waiters))
        paused = rows(waiters)
        print(
            f"paused lane: runners={statuses(runners)} waiters_started={started_while_paused} "
            f"waiters={[row.status for row in paused]}"
        )
        assert started_while_paused == 0
        assert [row.status for row in paused] == [Status.QUEUED] * 10
        assert all(row.claimed_by == "" and row.attempt == 0 for row in paused)
        assert {row.pk: row.queued_at for row in paused} == queued_at

        # One at a time after the resume, so the start order is the claim order itself.
        Lane.objects.filter(name="reports").update(max_concurrent_jobs=1)
        assert lanes.resume(["reports"]) == 1
        wait_for(
            lambda: count_completed(waiters) == 10,
            120,
            interval=0.5,
            message=f"the resumed lane's jobs did not all complete: {statuses(waiters)}",
        )
    events.close()
    order = events.started(waiters)
    started_at = [(row.started_at, str(row.pk)) for row in rows(waiters) if row.started_at]
    by_started_at = [job_id for _, job_id in sorted(started_at)]
    print(f"resumed lane, start order: {labelled(waiters, order)}")
    expected = claim_order(waiters)
    assert labelled(waiters, expected) == [f"{p}:w{p}" for p in sorted(priorities, reverse=True)]
    assert order == expected
    assert by_started_at == expected
    assert {row.pk: row.queued_at for row in rows(waiters)} == queued_at


# -- an unknown lane is refused ------------------------------------------------------------


TASKS = "tests.test_lanes"


def _report(n: int) -> str:
    return f"echo report {int(n)}"


@pytest.mark.django_db
def test_a_job_naming_an_unknown_lane_is_refused_and_nothing_is_saved(
    qm: JobQueueManager,
) -> None:
    Lane.objects.create(name="reports", max_concurrent_jobs=1)

    def refused(call: Any) -> None:
        with pytest.raises(ValidationError) as info:
            call()
        assert "lane" in info.value.message_dict, info.value.message_dict
        assert "nope" in " ".join(info.value.message_dict["lane"])
        assert not ContainerJob.objects.exists()

    def unsaved() -> ContainerJob:
        return ContainerJob(docker_image="busybox:latest", command="echo hi", lane="nope")

    refused(lambda: unsaved().full_clean())
    refused(lambda: unsaved().delay())
    refused(lambda: unsaved().apply_async(countdown=5, priority=60))
    refused(lambda: ContainerJob(docker_image="busybox:latest").apply_async(lane="nope"))
    refused(lambda: ContainerJob.objects.create_job(docker_image="busybox:latest", lane="nope"))

    # A container task may name its lane in the decorator or per call; an unknown one is
    # refused when declared (if the declaration reads the database) or when called.
    refused(
        lambda: container_task(image="busybox:latest", lane="nope", task_name=f"{TASKS}.nope")(
            _report
        ).delay(1)
    )
    reports = container_task(image="busybox:latest", lane="reports", task_name=f"{TASKS}.reports")(
        _report
    )
    refused(lambda: reports.apply_async((1,), lane="nope"))
    plain = container_task(image="busybox:latest", task_name=f"{TASKS}.plain")(_report)
    refused(lambda: plain.apply_async((1,), lane="nope"))

    # A saved job moved to an unknown lane is refused too, and keeps its lane.
    job = ContainerJob.objects.create_job(docker_image="busybox:latest", lane="reports")
    job.lane = "nope"
    with pytest.raises(ValidationError) as info:
        job.delay()
    assert "lane" in info.value.message_dict
    job.refresh_from_db()
    assert (job.lane, job.status) == ("reports", Status.PENDING)
    with pytest.raises(ValidationError) as info:
        job.apply_async(lane="nope")
    assert "lane" in info.value.message_dict
    job.refresh_from_db()
    assert (job.lane, job.status) == ("reports", Status.PENDING)

    # The known lane is accepted, and its job runs through the engine.
    qm.queue_job(job)
    ran, _progress = qm.run_job(job.pk)
    assert ran is not None and ran.lane == "reports"
