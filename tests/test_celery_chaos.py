"""Chaos against real Celery processes: workers killed or shut down mid-job, the broker
stopped while jobs are queued. The database row must stay the truth throughout: nothing is
lost, nothing runs twice, nothing stays ``running`` forever.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import docker.errors
import pytest

from django_container_celery.models import ContainerJob
from django_container_celery.states import Status

from .celery_app import app
from .celery_support import (
    Proc,
    RedisServer,
    celery_cluster,
    reload,
    wait_for,
    wait_running,
)
from .conftest import containers_of

pytestmark = [
    pytest.mark.celery,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

# Short leases so that a dead worker's job is rescued within seconds.
RESCUE_SETTINGS = {"LEASE_SECONDS": 3, "KEEP_CONTAINERS": True}


def make_job(image: str, command: str, **fields: Any) -> ContainerJob:
    fields.setdefault("timeout_seconds", 120)
    return ContainerJob.objects.create_job(docker_image=image, command=command, **fields)


def wait_exit(proc: Proc, timeout: float = 30) -> None:
    wait_for(lambda: not proc.alive(), timeout, message=f"{proc.name} did not exit")


def container_state(docker_client: Any, job: ContainerJob) -> str:
    container = docker_client.containers.get(reload(job).container_name)
    return str(container.status)


def remove_containers(docker_client: Any, job: ContainerJob) -> None:
    for container in containers_of(docker_client, job.pk):
        container.remove(force=True)


def no_containers(docker_client: Any, job: ContainerJob) -> bool:
    """True once the job's containers are gone (removal follows the final write)."""
    try:
        return containers_of(docker_client, job.pk) == []
    except docker.errors.NotFound:  # removed while being listed
        return False


def watch_until_final(job: ContainerJob, timeout: float) -> tuple[ContainerJob, set[str]]:
    """Wait for the job to be final; also return every claim owner seen on the way."""
    owners: set[str] = set()

    def final() -> ContainerJob | None:
        row = reload(job)
        if row.claimed_by:
            owners.add(row.claimed_by)
        return row if row.is_final else None

    try:
        row = wait_for(final, timeout, interval=0.05)
    except AssertionError:
        row = reload(job)
        raise AssertionError(
            f"job still {row.status} after {timeout}s (owner {row.claimed_by!r}, "
            f"lease {row.lease_expires_at}, error {row.last_error!r})"
        ) from None
    return row, owners


def held_by_a(claim: str, launcher: str) -> bool:
    """The claim is worker wa's: its launching pool process's, or its watcher's (which
    takes the claims of the running jobs on the host it leads)."""
    return claim == launcher or claim.startswith("watcher@wa@")


def leads(proc: Proc) -> bool:
    """The worker's watcher has logged that it leads a host."""
    return " leads " in proc.log_path.read_text(errors="replace")


# -- a worker killed with SIGKILL -------------------------------------------------------------


def test_sigkilled_worker_running_container_is_adopted_and_followed(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    job = make_job(test_image, "sh -c 'sleep 6; echo survived'")
    try:
        with celery_cluster(broker_url, **RESCUE_SETTINGS) as cluster:
            worker_a = cluster.worker("wa", concurrency=1)
            job.delay()
            running = wait_running(job)
            owner_a = running.claimed_by
            worker_a.signal_group(signal.SIGKILL)
            wait_exit(worker_a)
            killed_at = time.monotonic()

            # Nothing was written by the dead worker; its container runs on in Docker.
            after_kill = reload(job)
            assert after_kill.status == Status.RUNNING
            assert held_by_a(after_kill.claimed_by, owner_a), after_kill.claimed_by
            assert container_state(docker_client, job) == "running"

            worker_b = cluster.worker("wb", concurrency=1)
            final, owners = watch_until_final(job, timeout=60)
            rescued_in = time.monotonic() - killed_at

            containers = containers_of(docker_client, job.pk)
            print(f"containers labelled with the job: {len(containers)}; owners seen: {owners}")
            print(f"completed {rescued_in:.1f}s after the kill")
            assert final.status == Status.COMPLETED, final.last_error
            assert final.stdout_log == "survived\n" and final.exit_code == 0
            assert len(containers) == 1 and containers[0].name == f"dcc-{job.pk}-a1"
            assert final.attempt == 1 and final.retry_count == 0
            # The second worker's watcher took the claim over and finished the job.
            assert any(not held_by_a(owner, owner_a) for owner in owners), owners
            assert leads(worker_b)
            assert app.AsyncResult(final.celery_task_id).get(timeout=10)["stdout"] == "survived\n"
    finally:
        remove_containers(docker_client, job)


def test_sigkilled_worker_exited_container_is_harvested(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    job = make_job(test_image, "sh -c 'sleep 1; echo quick'")
    try:
        with celery_cluster(broker_url, **RESCUE_SETTINGS) as cluster:
            worker_a = cluster.worker("wa", concurrency=1)
            job.delay()
            owner_a = wait_running(job).claimed_by
            worker_a.signal_group(signal.SIGKILL)
            wait_exit(worker_a)
            # The container ends while no worker is alive to see it.
            wait_for(
                lambda: container_state(docker_client, job) == "exited",
                30,
                message="container did not exit",
            )
            orphaned = reload(job)
            assert orphaned.status == Status.RUNNING
            assert held_by_a(orphaned.claimed_by, owner_a), orphaned.claimed_by
            assert orphaned.exit_code is None

            worker_b = cluster.worker("wb", concurrency=1)
            cluster.beat()
            final, owners = watch_until_final(job, timeout=60)
            containers = containers_of(docker_client, job.pk)
            print(f"containers labelled with the job: {len(containers)}; owners seen: {owners}")

            assert final.status == Status.COMPLETED, final.last_error
            assert final.stdout_log == "quick\n" and final.exit_code == 0
            assert final.attempt == 1 and len(containers) == 1
            # Its exit happened while no watcher ran: the new leader's reconcile found it.
            assert leads(worker_b)
    finally:
        remove_containers(docker_client, job)


# -- the broker stopped while a job is queued ------------------------------------------------


def test_job_queued_while_redis_is_down_runs_once_redis_is_back(
    test_image: str, docker_client: Any
) -> None:
    redis = RedisServer()
    redis.start()
    try:
        with celery_cluster(redis.url) as cluster:
            worker = cluster.worker("w1", concurrency=1)
            cluster.beat()
            redis.stop()

            job = make_job(test_image, "echo after-outage")
            started = time.monotonic()
            job.delay()  # must not raise: the database keeps the job
            took = time.monotonic() - started
            print(f"delay() with the broker down returned in {took:.2f}s")
            queued = reload(job)
            assert queued.status == Status.QUEUED and queued.dispatched_at is None
            # The result backend's retries are capped in tests/settings.py; by default Celery
            # retries its Redis subscription for about 20 s before the send gives up.
            assert took < 45

            # Let worker and beat notice the outage before the broker comes back.
            wait_for(
                lambda: "Connection to broker lost" in worker.log_path.read_text(errors="replace"),
                30,
                message="the worker never noticed the outage",
            )
            assert reload(job).status == Status.QUEUED

            redis.start()  # same port, empty: every message sent before is gone
            final, _ = watch_until_final(job, timeout=90)
            assert final.status == Status.COMPLETED, final.last_error
            assert final.stdout_log == "after-outage\n"
            assert final.attempt == 1
            wait_for(lambda: no_containers(docker_client, final), 20, message="container kept")
            # This process's result backend recovered too: the job's result can be read.
            result = app.AsyncResult(final.celery_task_id).get(timeout=30)
            assert result["stdout"] == "after-outage\n"
    finally:
        redis.stop()


# -- cold shutdown (warm shutdown is in test_detached.py) ----------------------------------


def test_cold_shutdown_leaves_job_running_for_rescue(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    job = make_job(test_image, "sh -c 'sleep 8; echo cold'")
    try:
        with celery_cluster(broker_url, **RESCUE_SETTINGS) as cluster:
            worker_a = cluster.worker("wa", concurrency=1)
            job.delay()
            wait_running(job)
            # The launcher's claim passes to the watcher leading the host (wa's own).
            owner_a = wait_for(
                lambda: (
                    (reload(job).claimed_by or "").startswith("watcher@wa@")
                    and reload(job).claimed_by
                ),
                10,
                interval=0.05,
                message="wa's watcher never took the running job",
            )
            # Warm shutdown first, then the operator insists: cold shutdown.
            worker_a.popen.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            worker_a.popen.send_signal(signal.SIGQUIT)
            wait_exit(worker_a, timeout=30)

            left = reload(job)
            assert left.status == Status.RUNNING, (left.status, left.last_error)
            assert left.claimed_by == owner_a and left.exit_code is None
            assert left.stdout_log == "" and left.completed_at is None
            assert container_state(docker_client, job) == "running"

            worker_b = cluster.worker("wb", concurrency=1)
            cluster.beat()
            final, owners = watch_until_final(job, timeout=60)
            containers = containers_of(docker_client, job.pk)
            print(f"containers labelled with the job: {len(containers)}; owners seen: {owners}")

            assert final.status == Status.COMPLETED, final.last_error
            assert final.stdout_log == "cold\n" and final.exit_code == 0
            assert len(containers) == 1 and final.attempt == 1
            assert leads(worker_b)
    finally:
        remove_containers(docker_client, job)
