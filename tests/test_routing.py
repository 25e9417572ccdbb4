"""Broker priority, queue routing and the periodic schedule (no broker needed)."""

from __future__ import annotations

import pytest
from django.test import override_settings

from django_container_celery.beat import beat_schedule, install_periodic_tasks
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.routing import broker_priority, message_options, queue_for


@pytest.mark.parametrize(
    ("job_priority", "redis", "amqp"),
    [(0, 9, 0), (20, 7, 2), (50, 4, 5), (80, 2, 7), (100, 0, 9)],
)
def test_higher_job_priority_is_served_first_on_both_brokers(
    job_priority: int, redis: int, amqp: int
) -> None:
    # kombu's Redis transport serves low numbers first, RabbitMQ high numbers first.
    assert broker_priority(job_priority, "redis://127.0.0.1:6379/0") == redis
    assert broker_priority(job_priority, "amqp://guest@127.0.0.1//") == amqp


def test_priority_order_is_monotonic() -> None:
    redis = [broker_priority(p, "redis://x") for p in range(101)]
    amqp = [broker_priority(p, "amqp://x") for p in range(101)]
    assert redis == sorted(redis, reverse=True) and amqp == sorted(amqp)


@pytest.mark.django_db
def test_queue_routing_default_configured_and_per_host() -> None:
    host = ExecutorHost.objects.create(name="gpu-1")
    pinned = ContainerJob.objects.create(docker_image="busybox", docker_host=host)
    free = ContainerJob.objects.create(docker_image="busybox")
    assert queue_for(pinned) is None and "queue" not in message_options(free, "redis://x")
    with override_settings(CONTAINER_CELERY={"TASK_QUEUE": "containers"}):
        assert queue_for(free) == "containers" and queue_for(pinned) == "containers"
    with override_settings(CONTAINER_CELERY={"PER_HOST_QUEUES": True}):
        assert queue_for(pinned) == "dcc.gpu-1" and queue_for(free) is None
        assert message_options(pinned, "redis://x")["queue"] == "dcc.gpu-1"
    with override_settings(CONTAINER_CELERY={"PER_HOST_QUEUES": True, "TASK_QUEUE": "jobs"}):
        assert queue_for(pinned) == "jobs.gpu-1" and queue_for(free) == "jobs"


def test_beat_schedule_follows_settings() -> None:
    with override_settings(CONTAINER_CELERY={"DISPATCH_INTERVAL": 7, "TASK_QUEUE": "q"}):
        schedule = beat_schedule()
    tasks = {entry["task"]: entry for entry in schedule.values()}
    assert set(tasks) == {
        "django_container_celery.dispatch_ready_jobs",
        "django_container_celery.rescue_stale_jobs",
        "django_container_celery.cleanup_old_jobs",
    }
    assert tasks["django_container_celery.dispatch_ready_jobs"]["schedule"] == 7.0
    assert all(entry["options"]["queue"] == "q" for entry in schedule.values())


@pytest.mark.django_db
def test_install_periodic_tasks_updates_on_settings_change() -> None:
    from django_celery_beat.models import PeriodicTask

    assert {action for _, action in install_periodic_tasks()} == {"created"}
    assert {action for _, action in install_periodic_tasks()} == {"unchanged"}
    with override_settings(CONTAINER_CELERY={"DISPATCH_INTERVAL": 9}):
        actions = dict(install_periodic_tasks())
    assert actions["container-jobs: dispatch ready jobs"] == "updated"
    dispatch = PeriodicTask.objects.get(name="container-jobs: dispatch ready jobs")
    assert dispatch.interval is not None and dispatch.interval.every == 9
    assert PeriodicTask.objects.filter(name__startswith="container-jobs:").count() == 3
