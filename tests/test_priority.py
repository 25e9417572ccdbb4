"""Priority, then FIFO, with real Celery workers, PostgreSQL, Redis and Docker: whatever
order run messages arrive in, the job that starts when a slot frees is the best one
waiting for it. Start order is read from the daemon's container start events."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import group
from django.conf import settings
from django.utils import timezone

from django_container_celery.api import RUN_TASK
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import queue_manager
from django_container_celery.states import Status

from .celery_support import celery_cluster, wait_for
from .docker_events import ContainerEvents

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]

# Exits at once on the stop signal, so cancelling the blockers is quick.
LONG = "sh -c 'trap \"exit 0\" TERM; sleep 600 & wait'"


def create(made: list[ContainerJob], image: str, command: str, **fields: Any) -> ContainerJob:
    fields.setdefault("max_retries", 0)
    job = ContainerJob.objects.create_job(docker_image=image, command=command, **fields)
    made.append(job)
    return job


def solo_host() -> ExecutorHost:
    return ExecutorHost.objects.create(
        name="solo", connection_string=str(settings.DOCKER_HOST), max_concurrent_jobs=1
    )


def statuses(jobs: list[ContainerJob]) -> list[str]:
    rows = dict(
        ContainerJob.objects.filter(pk__in=[j.pk for j in jobs]).values_list("pk", "status")
    )
    return [rows[job.pk] for job in jobs]


def claim_order(jobs: list[ContainerJob]) -> list[str]:
    """The order the claim promises: priority, then the time each job was queued."""
    rows = ContainerJob.objects.filter(pk__in=[j.pk for j in jobs])
    return [
        str(pk) for pk in rows.order_by("-priority", "queued_at", "id").values_list("pk", flat=True)
    ]


def labelled(jobs: list[ContainerJob], order: list[str]) -> list[str]:
    names = {str(job.pk): f"{job.priority}:{job.name.rsplit('.', 1)[-1]}" for job in jobs}
    return [names[job_id] for job_id in order]


def test_quickstart_defaults_give_a_freed_slot_to_the_high_job(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    # The quickstart's sizes: global limit 10 (the default), one worker of concurrency 2
    # with Celery's default prefetch, and beat.
    assert "MAX_CONCURRENT_JOBS" not in settings.CONTAINER_CELERY
    with celery_cluster(broker_url) as cluster:
        cluster.worker("w1", concurrency=2, extra=("--prefetch-multiplier", "4"))
        cluster.beat()
        busy = [create(made, test_image, LONG, name=f"busy-{n}") for n in range(10)]
        for job in busy:
            job.delay()
        wait_for(
            lambda: statuses(busy).count(Status.RUNNING) == 10,
            90,
            message=f"the ten long jobs did not all run: {statuses(busy)}",
        )
        starts = ContainerEvents(docker_client)
        low = [create(made, test_image, LONG, name=f"low-{n}", priority=20) for n in range(4)]
        for job in low:
            job.delay()
        high = create(made, test_image, LONG, name="high", priority=95)
        high.delay()
        waiting = [*low, high]

        # Each message was consumed while every slot was taken: none is in flight now.
        def consumed() -> bool:
            rows = ContainerJob.objects.filter(pk__in=[j.pk for j in waiting])
            return not rows.filter(dispatched_at__isnull=False).exists()

        wait_for(consumed, 30, message="the five run messages were not all consumed")
        assert statuses(waiting) == [Status.QUEUED] * 5
        assert busy[0].cancel()
        wait_for(lambda: starts.started(waiting), 30, message="nothing started in the free slot")
        wait_for(lambda: statuses([high]) == [Status.RUNNING], 30)
        starts.close()
        order = starts.started(waiting)
        print(f"quickstart defaults, one slot freed, start order: {labelled(waiting, order)}")
        assert order == [str(high.pk)]
        assert statuses(low) == [Status.QUEUED] * 4


def test_a_host_of_capacity_one_starts_jobs_by_priority_then_fifo(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    from .celery_app import app

    solo_host()
    jobs = [
        create(made, test_image, "sh -c 'sleep 1'", name=f"p{priority}-{n}", priority=priority)
        for n, priority in enumerate([20, 50, 80, 50, 80])
    ]
    for job in jobs:
        queue_manager.queue_job(job, celery_task_id=str(uuid.uuid4()))
    ContainerJob.objects.filter(pk__in=[j.pk for j in jobs]).update(dispatched_at=timezone.now())
    starts = ContainerEvents(docker_client)
    with celery_cluster(broker_url) as cluster:
        # The worst order for priority: lowest first, all at one broker priority, so the
        # broker delivers them as sent; they wait in the queue until the worker starts.
        for job in jobs:
            job.refresh_from_db()
            app.send_task(RUN_TASK, args=[str(job.pk)], task_id=job.celery_task_id, priority=5)
        cluster.worker("w1", concurrency=2, extra=("--prefetch-multiplier", "4"))
        wait_for(
            lambda: statuses(jobs) == [Status.COMPLETED] * 5,
            120,
            interval=0.5,
            message=f"not all completed: {statuses(jobs)}",
        )
    starts.close()
    order = starts.started(jobs)
    print(f"host of capacity 1, messages lowest first, start order: {labelled(jobs, order)}")
    assert order == claim_order(jobs)
    assert [job.priority for job in jobs if str(job.pk) == order[0]] == [80]


def test_signatures_on_a_host_of_capacity_one_start_by_priority_then_fifo(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    from . import priority_tasks

    solo_host()
    blocker = create(made, test_image, LONG, name="blocker")
    with celery_cluster(broker_url) as cluster:
        cluster.worker("w1", concurrency=3)
        blocker.delay()
        wait_for(lambda: statuses([blocker]) == [Status.RUNNING], 60)
        starts = ContainerEvents(docker_client)
        steps = group(
            priority_tasks.low_step.s("a"),
            priority_tasks.urgent_step.s("b"),
            priority_tasks.normal_step.s("c"),
            priority_tasks.urgent_step.s("d"),
            priority_tasks.low_step.s("e"),
        )
        result = steps.apply_async()
        step_jobs = ContainerJob.objects.filter(name__startswith="tests.priority_tasks.")

        def all_queued() -> bool:
            return step_jobs.filter(status=Status.QUEUED).count() == 5

        wait_for(all_queued, 60, message="the five steps did not all queue their jobs")
        jobs = list(step_jobs)
        made.extend(jobs)
        assert blocker.cancel()
        outputs = result.get(timeout=120)
    starts.close()
    order = starts.started(jobs)
    print(f"signatures on a host of capacity 1, start order: {labelled(jobs, order)}")
    assert sorted(out["stdout"] for out in outputs) == [f"{t}\n" for t in "abcde"]
    assert order == claim_order(jobs)
