"""Fixtures shared by the suite. A missing service fails the test that needs it, loudly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings

from . import celery_app  # noqa: F401 - makes the test app current for send_task

if TYPE_CHECKING:
    from django_container_celery.executors.memory import MemoryExecutor
    from django_container_celery.queue import JobQueueManager

# The plugin the package ships for its users' tests; the suite's fast tests use it too.
pytest_plugins = ["django_container_celery.testing"]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    import docker

    try:
        client = docker.DockerClient(base_url=settings.DOCKER_HOST, timeout=30)
        client.ping()
    except Exception as exc:  # any failure here means the daemon is not usable
        pytest.fail(
            f"Docker daemon at {settings.DOCKER_HOST} does not answer ({exc}); "
            "run `bash scripts/services.sh docker` or set DOCKER_HOST.",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> str:
    import docker.errors

    try:
        docker_client.images.get(settings.TEST_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"Test image {settings.TEST_IMAGE} is missing; run `bash scripts/services.sh image`.",
            pytrace=False,
        )
    return str(settings.TEST_IMAGE)


def containers_of(docker_client: Any, job_id: object) -> list[Any]:
    """Every container (running or exited) labelled with this job id."""
    return docker_client.containers.list(all=True, filters={"label": f"dcc.job_id={job_id}"})


@pytest.fixture
def made(docker_client: Any) -> Iterator[list[Any]]:
    """A list for the jobs a test creates: their containers are removed at the end,
    whatever happened."""
    jobs: list[Any] = []
    yield jobs
    for job in jobs:
        for container in containers_of(docker_client, job.pk):
            container.remove(force=True)


@pytest.fixture
def broker_url() -> str:
    """The shared broker from settings; fails the test when it does not answer."""
    import redis

    url = str(settings.CELERY_BROKER_URL)
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except Exception as exc:  # any failure means no usable broker
        pytest.fail(
            f"Redis at {url} does not answer ({exc}); run `bash scripts/services.sh redis`.",
            pytrace=False,
        )
    return url


@pytest.fixture
def mem() -> MemoryExecutor:
    """The in-memory executor, for tests of the engine that need no real container."""
    from django_container_celery.executors.memory import MemoryExecutor

    return MemoryExecutor()


@pytest.fixture
def qm(mem: MemoryExecutor) -> JobQueueManager:
    """A queue manager whose every host is ``mem``."""
    from django_container_celery.queue import JobQueueManager

    return JobQueueManager(executor_factory=lambda host: mem, worker_id="test-worker")
