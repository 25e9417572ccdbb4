"""Memory capacity under racing Celery workers, counted from the daemon's own events:
never more containers at once than the host's memory holds, and every job completes."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings

from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.states import Status

from .celery_support import celery_cluster, wait_for
from .docker_events import ContainerEvents

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def test_three_racing_workers_never_run_more_than_the_memory_holds(
    broker_url: str, test_image: str, docker_client: Any, made: list[ContainerJob]
) -> None:
    ExecutorHost.objects.create(
        name="small",
        connection_string=str(settings.DOCKER_HOST),
        max_concurrent_jobs=10,
        memory_capacity_mb=1024,
    )
    made.extend(
        ContainerJob.objects.create_job(
            docker_image=test_image,
            command="sh -c 'sleep 1'",
            memory_limit=300,
            max_retries=0,
            name=f"m300-{n}",
        )
        for n in range(20)
    )
    events = ContainerEvents(docker_client)
    with celery_cluster(broker_url) as cluster:
        for name in ("r1", "r2", "r3"):
            cluster.worker(name, concurrency=2)
        for job in made:
            job.delay()

        def completed() -> int:
            pks = [job.pk for job in made]
            return ContainerJob.objects.filter(pk__in=pks, status=Status.COMPLETED).count()

        wait_for(lambda: completed() == 20, 180, interval=0.5, message="not all completed")
    events.close()
    starts, most = len(events.started(made)), events.most_running_at_once(made)
    print(
        f"1024 MiB host, 20 jobs of 300 MiB, 3 workers: starts={starts}, "
        f"most running at once={most}, completed={completed()}"
    )
    assert starts == 20
    assert 1 <= most <= 3
