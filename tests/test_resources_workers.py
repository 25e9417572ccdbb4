"""Memory capacity under racing Celery workers, counted from the daemon's own events:
never more containers at once than the host's memory holds, and every job completes."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
from django.conf import settings

from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.states import Status

from .celery_support import celery_cluster, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]


class RunningAtOnce:
    """The most containers of the given jobs running at the same time, from start and die
    events read live."""

    def __init__(self, docker_client: Any, jobs: list[ContainerJob]) -> None:
        self.wanted = {str(job.pk) for job in jobs}
        self.running: set[str] = set()
        self.most = 0
        self.starts = 0
        self._stream = docker_client.api.events(
            filters={"type": "container", "label": "dcc.job_id"}, decode=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # closed under us at the end
            for event in self._stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                if attributes.get("dcc.job_id") not in self.wanted:
                    continue
                action, container = str(event.get("Action")), str(event.get("id"))
                if action == "start":
                    self.starts += 1
                    self.running.add(container)
                elif action in ("die", "destroy"):
                    self.running.discard(container)
                self.most = max(self.most, len(self.running))

    def close(self) -> None:
        time.sleep(0.5)  # the last events are on their way
        with contextlib.suppress(Exception):
            self._stream.close()


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
    counter = RunningAtOnce(docker_client, made)
    with celery_cluster(broker_url) as cluster:
        for name in ("r1", "r2", "r3"):
            cluster.worker(name, concurrency=2)
        for job in made:
            job.delay()

        def completed() -> int:
            pks = [job.pk for job in made]
            return ContainerJob.objects.filter(pk__in=pks, status=Status.COMPLETED).count()

        wait_for(lambda: completed() == 20, 180, interval=0.5, message="not all completed")
    counter.close()
    print(
        f"1024 MiB host, 20 jobs of 300 MiB, 3 workers: starts={counter.starts}, "
        f"most running at once={counter.most}, completed={completed()}"
    )
    assert counter.starts == 20
    assert 1 <= counter.most <= 3
