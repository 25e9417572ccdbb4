"""The pytest plugin users get (django_container_celery.testing), used as a user would:
container tasks tested without Docker, eagerly, and end to end with a real worker."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
from celery import chain

from django_container_celery import container_task
from django_container_celery.exceptions import ContainerJobFailed
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status
from django_container_celery.testing import FakeContainers, wait_for_job

from .container_tasks import IMAGE, say, shout

pytestmark = pytest.mark.django_db


@container_task(
    image="registry.example.com/tools/fetch:2.1",
    environment={"MODE": "fast"},
    memory_limit=64,
    cpu_limit=0.5,
    max_retries=2,
    retry_exit_codes=[75],
    retry_strategy="aggressive",
)
def fetch(url: str) -> str:
    return "fetch --quiet " + shlex.quote(url)


@container_task(image="registry.example.com/tools/fetch:2.1", timeout_seconds=1, max_retries=0)
def slow_export() -> str:
    return "export --all"


def test_eager_delay_runs_the_job_and_returns_a_ready_result(
    eager_containers: FakeContainers,
) -> None:
    eager_containers.program(fetch, stdout="fetched\n")
    result = fetch.delay("https://example.com/a b")
    assert result.ready() and result.successful()
    assert result.get()["stdout"] == "fetched\n"
    (spec,) = eager_containers.started_for(fetch)
    assert spec.image == "registry.example.com/tools/fetch:2.1"
    assert spec.command == ["fetch", "--quiet", "https://example.com/a b"]
    assert spec.environment == {"MODE": "fast"}
    assert (spec.memory_mb, spec.cpus) == (64, 0.5)


def test_a_listed_exit_code_is_retried_then_succeeds(eager_containers: FakeContainers) -> None:
    eager_containers.program(fetch, exit_code=0, stdout="second time lucky\n")
    eager_containers.program(fetch, exit_code=75, stderr="busy\n", times=1)
    result = fetch.delay("https://example.com")
    assert result.get()["stdout"] == "second time lucky\n"
    job = wait_for_job(result)
    assert (job.attempt, job.retry_count) == (2, 1)
    assert "listed in retry_exit_codes" in job.last_error
    assert len(eager_containers.started_for(fetch)) == 2


def test_a_failed_job_raises_from_get(eager_containers: FakeContainers) -> None:
    eager_containers.program(fetch, exit_code=3, stderr="not found\n")
    result = fetch.delay("https://example.com/missing")
    assert result.failed()
    with pytest.raises(ContainerJobFailed, match=r"exited with code 3"):
        result.get()


def test_a_job_past_its_timeout_is_killed(eager_containers: FakeContainers) -> None:
    eager_containers.program(slow_export, duration=60)
    result = slow_export.delay()
    job = wait_for_job(result)
    assert job.status == Status.FAILED
    assert "timed out after 1 seconds" in job.last_error
    assert eager_containers.executor.running_names() == []


def test_a_chain_of_container_tasks_runs_eagerly(eager_containers: FakeContainers) -> None:
    eager_containers.program(say, stdout="hello\n")
    eager_containers.program(shout, stdout="hello-again\n")
    result = chain(say.si("hello"), shout.s()).apply_async()
    assert result.get()["stdout"] == "hello-again\n"
    (second,) = eager_containers.started_for(shout)
    assert second.command == ["echo", "hello-again"]


def test_the_fake_executor_without_eager_mode(fake_containers: FakeContainers) -> None:
    fake_containers.program(exit_code=0, stdout="done\n")
    job = ContainerJob.objects.create_job(docker_image=IMAGE, command="run it")
    job.mark_as_queued()
    manager = JobQueueManager(worker_id="unit")
    assert manager.launch_next_batch(max_concurrent=1)["launched"] == 1
    manager.harvest_finished_jobs()
    row = wait_for_job(job, timeout=5)
    assert (row.status, row.stdout_log) == (Status.COMPLETED, "done\n")
    assert [spec.command for spec in fake_containers.started] == [["run", "it"]]


@pytest.mark.celery
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_end_to_end_with_a_real_worker_and_docker(container_worker: Any) -> None:
    result = say.delay("end-to-end")
    job = wait_for_job(result, timeout=60)
    assert (job.status, job.stdout_log) == (Status.COMPLETED, "end-to-end\n")
    assert result.get(timeout=10)["stdout"] == "end-to-end\n"


@container_task(image="registry.example.com/tools/fetch:2.1", name="nightly-fetch")
def nightly() -> str:
    return "fetch --all"


def test_countdown_is_ignored_and_jobs_named_by_their_options_are_matched(
    eager_containers: FakeContainers,
) -> None:
    eager_containers.program(nightly, stdout="all fetched\n")
    result = nightly.apply_async(countdown=3600)
    assert result.get()["stdout"] == "all fetched\n"
    assert len(eager_containers.started_for(nightly)) == 1
    assert wait_for_job(result.id).name == "nightly-fetch"  # by task id, as a string


def test_a_job_that_cannot_run_here_raises_instead_of_waiting(
    eager_containers: FakeContainers,
) -> None:
    from django_container_celery.eager import EagerJobStuck
    from django_container_celery.models import ExecutorHost

    host = ExecutorHost.objects.create(name="retired", is_active=False)
    job = ContainerJob.objects.create_job(docker_image=IMAGE, command="true", docker_host=host)
    with pytest.raises(EagerJobStuck, match="could not be claimed"):
        job.delay()
    assert eager_containers.started == []
