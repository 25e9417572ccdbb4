"""Runs detached from worker slots, against real Celery workers, PostgreSQL, Redis and
Docker: a worker of concurrency 2 keeps many containers running, its warm shutdown leaves
them running, and another worker's watcher finishes them; a killed leader is replaced."""

from __future__ import annotations

import collections
import re
import signal
import time
from typing import Any

import pytest
from django.db import connection

from django_container_celery.models import ContainerJob
from django_container_celery.states import Status
from django_container_celery.watching import WATCH_LOCK_CLASS

from .celery_support import Proc, celery_cluster, wait_for
from .conftest import containers_of
from .docker_events import ContainerEvents

pytestmark = [
    pytest.mark.celery,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]


def make_jobs(image: str, command: str, count: int, **fields: Any) -> list[ContainerJob]:
    fields.setdefault("timeout_seconds", 180)
    return [
        ContainerJob.objects.create_job(
            docker_image=image, command=command.format(n=n), max_retries=0, **fields
        )
        for n in range(count)
    ]


def statuses(jobs: list[ContainerJob]) -> collections.Counter[str]:
    pks = [job.pk for job in jobs]
    return collections.Counter(
        ContainerJob.objects.filter(pk__in=pks).values_list("status", flat=True)
    )


def running_containers(docker_client: Any, jobs: list[ContainerJob]) -> int:
    wanted = {str(job.pk) for job in jobs}
    found = docker_client.api.containers(filters={"label": "dcc.job_id", "status": "running"})
    return sum(1 for entry in found if (entry.get("Labels") or {}).get("dcc.job_id") in wanted)


def remove_all(docker_client: Any, jobs: list[ContainerJob]) -> None:
    for job in jobs:
        for container in containers_of(docker_client, job.pk):
            container.remove(force=True)


def leads(proc: Proc) -> bool:
    return bool(re.search(r"watcher \S+ leads", proc.log_path.read_text(errors="replace")))


def watch_lock_holders() -> set[int]:
    """Backend pids holding the default host's leadership lock in this database (another
    test run on the same server holds its own)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid::bigint = %s AND objid::bigint = 0 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [WATCH_LOCK_CLASS],
        )
        return {int(row[0]) for row in cursor.fetchall()}


def test_a_worker_of_concurrency_two_keeps_thirty_containers_running(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    jobs = make_jobs(test_image, "sh -c 'sleep 30; echo done-{n}'", 30)
    starts = ContainerEvents(docker_client)
    try:
        with celery_cluster(broker_url, MAX_CONCURRENT_JOBS=40, KEEP_CONTAINERS=True) as cluster:
            cluster.worker("w1", concurrency=2)
            for job in jobs:
                job.delay()
            peak = {"rows": 0, "containers": 0}

            def all_running() -> bool:
                peak["rows"] = max(peak["rows"], statuses(jobs)[Status.RUNNING])
                peak["containers"] = max(
                    peak["containers"], running_containers(docker_client, jobs)
                )
                return peak["rows"] == 30 and peak["containers"] == 30

            wait_for(all_running, 90, interval=0.5, message=f"not all running at once: {peak}")
            print(f"peak running at once: {peak}")
            wait_for(
                lambda: statuses(jobs)[Status.COMPLETED] == 30,
                120,
                interval=0.5,
                message=f"not all completed: {statuses(jobs)}",
            )
            outputs = sorted(
                ContainerJob.objects.filter(pk__in=[j.pk for j in jobs]).values_list(
                    "stdout_log", flat=True
                )
            )
            assert outputs == sorted(f"done-{n}\n" for n in range(30))
            per_job = starts.per_job(jobs)
            assert set(per_job.values()) == {1}, per_job
            for job in jobs:
                assert len(containers_of(docker_client, job.pk)) == 1
    finally:
        remove_all(docker_client, jobs)


def test_warm_shutdown_returns_at_once_and_another_worker_finishes_the_jobs(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    jobs = make_jobs(test_image, "sh -c 'sleep 12; echo after-{n}'", 5)
    with celery_cluster(broker_url) as cluster:
        first = cluster.worker("w1", concurrency=2)
        for job in jobs:
            job.delay()
        wait_for(lambda: statuses(jobs)[Status.RUNNING] == 5, 60, message="jobs did not start")
        first.popen.send_signal(signal.SIGTERM)  # the main process only, as an init system
        signalled = time.monotonic()
        wait_for(lambda: not first.alive(), 10, interval=0.05, message="warm shutdown hung")
        took = time.monotonic() - signalled
        print(f"warm shutdown took {took:.2f}s with 5 containers running")
        assert first.popen.returncode == 0
        assert running_containers(docker_client, jobs) == 5
        assert statuses(jobs) == {Status.RUNNING: 5}

        cluster.worker("w2", concurrency=1)
        wait_for(
            lambda: statuses(jobs)[Status.COMPLETED] == 5,
            60,
            message=f"the second worker did not finish them: {statuses(jobs)}",
        )
    outputs = sorted(
        ContainerJob.objects.filter(pk__in=[j.pk for j in jobs]).values_list(
            "stdout_log", flat=True
        )
    )
    assert outputs == sorted(f"after-{n}\n" for n in range(5))
    assert {job.attempt for job in ContainerJob.objects.filter(pk__in=[j.pk for j in jobs])} == {1}


def test_a_killed_leader_is_replaced_and_its_jobs_are_finished(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    if connection.vendor != "postgresql":
        pytest.fail("leadership needs PostgreSQL; set DATABASE_URL", pytrace=False)
    jobs = make_jobs(test_image, "sh -c 'sleep 8; echo kept-{n}'", 3)
    with celery_cluster(broker_url) as cluster:
        leader = cluster.worker("wa", concurrency=1)
        wait_for(lambda: leads(leader), 30, message=f"wa never led:\n{leader.log_tail()}")
        standby = cluster.worker("wb", concurrency=1)
        [old_pid] = watch_lock_holders()
        for job in jobs:
            job.delay()
        wait_for(lambda: statuses(jobs)[Status.RUNNING] == 3, 60, message="jobs did not start")
        assert not leads(standby)

        leader.signal_group(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: watch_lock_holders() - {old_pid},
            15,
            interval=0.05,
            message=f"no watcher took over:\n{standby.log_tail()}",
        )
        took_over = time.monotonic() - killed
        wait_for(lambda: leads(standby), 10, message="the new holder is not the standby")
        wait_for(
            lambda: statuses(jobs)[Status.COMPLETED] == 3,
            60,
            message=f"the new leader did not finish the jobs: {statuses(jobs)}",
        )
        print(f"a standby led {took_over:.2f}s after the leader was SIGKILLed")
    rows = ContainerJob.objects.filter(pk__in=[j.pk for j in jobs])
    assert sorted(r.stdout_log for r in rows) == sorted(f"kept-{n}\n" for n in range(3))
    assert {r.attempt for r in rows} == {1}
