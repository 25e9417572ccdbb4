"""Celery integration against a real worker process, Redis, PostgreSQL and Docker."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import chain
from django.utils import timezone

from django_container_celery.api import RUN_TASK
from django_container_celery.exceptions import ContainerJobFailed
from django_container_celery.models import ContainerJob
from django_container_celery.states import Status

from .celery_app import app
from .celery_support import celery_cluster, wait_for
from .conftest import containers_of

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def make_job(test_image: str, command: str = "echo hello", **fields: Any) -> ContainerJob:
    return ContainerJob.objects.create_job(
        docker_image=test_image, command=command, timeout_seconds=120, **fields
    )


def test_delay_runs_the_container_and_returns_its_result(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    with celery_cluster(broker_url) as cluster:
        cluster.worker(concurrency=2)
        job = make_job(test_image, "sh -c 'echo out; echo err >&2'")
        result = job.delay()
        value = result.get(timeout=60)
        assert value["status"] == "completed" and value["exit_code"] == 0
        assert value["stdout"] == "out\n" and value["stderr"] == "err\n"
        assert value["job_id"] == str(job.pk)
        job.refresh_from_db()
        assert job.celery_task_id == result.id and job.status == Status.COMPLETED
        # Removed after the result is recorded (off the finishing path).
        wait_for(lambda: containers_of(docker_client, job.pk) == [], 20, message="container kept")


def test_failed_job_raises_on_get(broker_url: str, test_image: str) -> None:
    with celery_cluster(broker_url) as cluster:
        cluster.worker(concurrency=1)
        job = make_job(test_image, "sh -c 'exit 3'", max_retries=0)
        with pytest.raises(ContainerJobFailed, match="code 3"):
            job.delay().get(timeout=60)
        job.refresh_from_db()
        assert (job.status, job.exit_code) == (Status.FAILED, 3)


def test_same_message_five_times_starts_one_container(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    with celery_cluster(broker_url, KEEP_CONTAINERS=True) as cluster:
        cluster.worker("w1", concurrency=3)
        cluster.worker("w2", concurrency=3)
        job = make_job(test_image, "sh -c 'sleep 1; echo once'")
        job.mark_as_queued()
        task_id = "dup-" + str(job.pk)
        ContainerJob.objects.filter(pk=job.pk).update(
            celery_task_id=task_id, dispatched_at=timezone.now()
        )
        barrier = threading.Barrier(5)

        def send() -> None:
            barrier.wait()
            app.send_task(RUN_TASK, args=[str(job.pk)], task_id=task_id)

        threads = [threading.Thread(target=send) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        job.wait(timeout=60)
        try:
            containers = containers_of(docker_client, job.pk)
            assert len(containers) == 1
            assert containers[0].name == f"dcc-{job.pk}-a1"
            assert job.status == Status.COMPLETED and job.stdout_log == "once\n"
            assert app.AsyncResult(task_id).get(timeout=10)["stdout"] == "once\n"
        finally:
            for container in containers_of(docker_client, job.pk):
                container.remove(force=True)


def test_chain_of_two_container_tasks(broker_url: str, test_image: str) -> None:
    from .container_tasks import say, shout

    with celery_cluster(broker_url) as cluster:
        cluster.worker(concurrency=2)
        result = chain(say.s("hello"), shout.s()).apply_async()
        value = result.get(timeout=90)
        assert value["stdout"] == "hello-again\n"
        names = set(ContainerJob.objects.values_list("name", flat=True))
        assert names == {"tests.container_tasks.say", "tests.container_tasks.shout"}
        assert set(ContainerJob.objects.values_list("status", flat=True)) == {"completed"}


def test_group_of_three_container_tasks(broker_url: str, test_image: str) -> None:
    from celery import group

    from .container_tasks import say

    with celery_cluster(broker_url) as cluster:
        cluster.worker(concurrency=3)
        result = group(say.s(word) for word in ("one", "two", "three")).apply_async()
        values = result.get(timeout=90)
    assert [value["stdout"] for value in values] == ["one\n", "two\n", "three\n"]
    assert ContainerJob.objects.filter(status=Status.COMPLETED).count() == 3


def test_container_task_delay_validates_in_the_caller(test_image: str) -> None:
    from django.core.exceptions import ValidationError

    from django_container_celery import container_task

    @container_task(image=test_image)
    def broken(image: str) -> str:
        return "echo never"

    with pytest.raises(ValidationError) as info:
        broken.apply_async(("x",), priority=500)
    assert "priority" in info.value.message_dict
    assert not ContainerJob.objects.exists()
    wait_for(lambda: True, 0.1)
