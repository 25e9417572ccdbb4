"""Attempt integrity under adversity, against real services: a daemon too slow to launch
within a lease, a worker whose clock runs fast, a container removed under a running job, a
daemon that stops while its jobs run. Faults come from outside the app: a socket proxy, a
preloaded fake clock, the Docker API, a stopped dockerd.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from django_container_celery.conf import app_settings
from django_container_celery.executors.base import JOB_LABEL
from django_container_celery.models import ContainerJob, ExecutorHost, database_now
from django_container_celery.states import Status

from .celery_support import ROOT, celery_cluster, reload, wait_for, wait_running
from .celery_support import test_database_url as database_url_for_tests
from .daemons import second_daemon
from .docker_proxy import DockerProxy

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

FAKETIME_LIB = Path(
    os.environ.get("DCC_FAKETIME_LIB", "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
)


def wait_final(job: ContainerJob, timeout: float) -> ContainerJob:
    def final() -> ContainerJob | None:
        row = reload(job)
        return row if row.is_final else None

    try:
        return wait_for(final, timeout, interval=0.1)
    except AssertionError:
        row = reload(job)
        raise AssertionError(
            f"job still {row.status} after {timeout}s (attempt {row.attempt}, owner "
            f"{row.claimed_by!r}, error {row.last_error!r})"
        ) from None


@contextmanager
def docker_events(client: Any, job: ContainerJob) -> Iterator[list[tuple[str, str]]]:
    """Every (action, container id) the daemon reports for the job's containers."""
    seen: list[tuple[str, str]] = []
    stream = client.events(
        decode=True, filters={"type": "container", "label": f"{JOB_LABEL}={job.pk}"}
    )

    def read() -> None:
        try:
            for event in stream:
                seen.append((str(event.get("Action")), str(event.get("id"))))
        except Exception:  # the stream is closed at the end
            return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield seen
    finally:
        time.sleep(0.5)  # the last events are on their way
        stream.close()
        reader.join(5)


def most_running_at_once(events: list[tuple[str, str]]) -> int:
    running: set[str] = set()
    most = 0
    for action, container in events:
        if action == "start":
            running.add(container)
        elif action in ("die", "destroy"):
            running.discard(container)
        most = max(most, len(running))
    return most


# -- a launch slower than the lease ---------------------------------------------------------


@pytest.mark.celery
@pytest.mark.slow
@pytest.mark.parametrize("slow_call", ["create", "start"])
def test_a_launch_slower_than_its_lease_ends_with_one_container(
    slow_call: str, broker_url: str, test_image: str, docker_client: Any
) -> None:
    # The launcher stops renewing after LAUNCH_TIMEOUT; its lease runs out while the
    # daemon still holds its call, and the watcher takes the launch over through the same
    # slow daemon. Whoever wins, one container runs, once.
    pattern = (
        r"^POST /v[\d.]+/containers/create"
        if slow_call == "create"
        else (r"^POST /v[\d.]+/containers/[0-9a-f]+/start")
    )
    settings = {"LEASE_SECONDS": 3, "LAUNCH_TIMEOUT": 1, "RECONCILE_INTERVAL": 1.0}
    with DockerProxy(delay=8.0, delay_pattern=pattern) as proxy:
        host = ExecutorHost.objects.create(
            name="slow-daemon", connection_string=proxy.url, max_concurrent_jobs=2
        )
        job = ContainerJob.objects.create_job(
            docker_image=test_image,
            command="sh -c 'sleep 2; echo ran-once'",
            docker_host=host,
            timeout_seconds=120,
        )
        owners: set[str] = set()
        with (
            celery_cluster(broker_url, **settings) as cluster,
            docker_events(docker_client, job) as events,
        ):
            cluster.worker("wa", concurrency=1)
            job.delay()

            def final() -> ContainerJob | None:
                row = reload(job)
                if row.claimed_by:
                    owners.add(row.claimed_by)
                return row if row.is_final else None

            row = wait_for(final, 90, interval=0.05, message="job never ended")
        actions = Counter(action for action, _ in events)
        print(
            f"slow {slow_call}: delayed calls {len(proxy.delayed)}, events {dict(actions)}, "
            f"most running at once {most_running_at_once(events)}, owners {sorted(owners)}"
        )
        assert row.status == Status.COMPLETED, row.last_error
        assert row.stdout_log.strip() == "ran-once"
        assert (row.attempt, row.retry_count) == (1, 0)
        # Both the launcher and the watcher that took over went through the slow call.
        assert len(proxy.delayed) >= 2, proxy.delayed
        assert any(owner.startswith("watcher@") for owner in owners), owners
        assert actions["start"] == 1, events
        assert actions["die"] == 1, events
        assert most_running_at_once(events) == 1


# -- a container created and never started ---------------------------------------------------


def test_an_unstarted_container_is_replaced_only_while_the_claim_holds(
    test_image: str, docker_client: Any
) -> None:
    from django_container_celery import claims
    from django_container_celery.executors.docker import DockerExecutor
    from django_container_celery.launching import launch_claimed

    executor = DockerExecutor(app_settings.DEFAULT_DOCKER_HOST)
    job = ContainerJob.objects.create_job(docker_image=test_image, command="sh -c 'echo new'")
    job.mark_as_queued()
    mine = claims.claim_next("launcher")
    assert mine is not None
    # A first launcher created the attempt's container and died before starting it.
    docker_client.api.create_container(test_image, command=["true"], name=mine.container_name)
    try:
        # A launcher that lost its claim leaves that container alone...
        stale_view = ContainerJob.objects.get(pk=job.pk)
        ContainerJob.objects.filter(pk=job.pk).update(claimed_by="someone-else")
        assert not launch_claimed(stale_view, executor).success
        assert [
            c.status
            for c in docker_client.containers.list(all=True, filters={"name": mine.container_name})
        ] == ["created"]
        # ...while the owner replaces it and runs the attempt once.
        ContainerJob.objects.filter(pk=job.pk).update(claimed_by="launcher")
        assert launch_claimed(mine, executor).success
        assert executor.wait(mine.container_name, 30) == 0
        assert executor.logs(mine.container_name, 1000)[0] == "new\n"
    finally:
        with contextlib.suppress(Exception):
            docker_client.api.remove_container(mine.container_name, force=True)


# -- a worker whose clock runs two minutes fast --------------------------------------------


FAST_CLOCK_SCRIPT = """
import json, django
django.setup()
from django_container_celery import claims
from django_container_celery.queue import queue_manager
rescued = queue_manager.rescue_stale_jobs()
claimed = claims.claim_next("fast-worker")
print(json.dumps({"rescued": rescued, "claimed": str(claimed.pk) if claimed else None}))
"""


def run_with_fast_clock(script: str, seconds: int = 120) -> dict[str, Any]:
    assert FAKETIME_LIB.exists(), f"{FAKETIME_LIB} is missing: run bash scripts/services.sh"
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url_for_tests(),
        PYTHONPATH=str(ROOT),
        LD_PRELOAD=str(FAKETIME_LIB),
        FAKETIME=f"+{seconds}s",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        DCC_SETTINGS_JSON=json.dumps({"WATCHER": False}),
    )
    env.pop("DCC_TEST_DATABASE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def test_a_worker_with_a_fast_clock_takes_over_no_live_lease(test_image: str) -> None:
    from django_container_celery import claims

    live = ContainerJob.objects.create_job(docker_image=test_image, command="true", priority=90)
    live.mark_as_queued()
    claimed = claims.claim_next("live-worker")
    assert claimed is not None and claimed.pk == live.pk
    before = reload(live)
    # The fake clock is real: the process believes it is two minutes later.
    probe = run_with_fast_clock("import time; print('{\"t\": %f}' % time.time())")
    assert probe["t"] - time.time() > 100

    waiting = ContainerJob.objects.create_job(docker_image=test_image, command="true")
    waiting.mark_as_queued()
    result = run_with_fast_clock(FAST_CLOCK_SCRIPT)

    after = reload(live)
    assert result["rescued"] == 0
    assert (after.claimed_by, after.attempt, after.status) == (
        "live-worker",
        before.attempt,
        Status.LAUNCHING,
    )
    assert after.lease_expires_at == before.lease_expires_at
    # The fast worker's own lease is measured by the database's clock, not two minutes on.
    assert result["claimed"] == str(waiting.pk)
    theirs = reload(waiting)
    assert theirs.lease_expires_at is not None
    left = (theirs.lease_expires_at - database_now()).total_seconds()
    lease = app_settings.LEASE_SECONDS
    print(f"lease written by the fast worker expires in {left:.1f}s (LEASE_SECONDS={lease})")
    assert lease - 10 < left <= lease


# -- a container removed under its running job ------------------------------------------------


@pytest.mark.celery
def test_a_running_container_removed_with_rm_f_is_retried(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    job = ContainerJob.objects.create_job(
        docker_image=test_image,
        command="sh -c 'sleep 3; echo second-run'",
        max_retries=2,
        retry_strategy="aggressive",
        timeout_seconds=120,
    )
    with celery_cluster(broker_url, RECONCILE_INTERVAL=1.0) as cluster:
        cluster.worker("wa", concurrency=1)
        cluster.beat()  # dispatches the retry when its back-off is over
        job.delay()
        first = wait_running(job)
        docker_client.containers.get(first.container_name).remove(force=True)
        row = wait_final(job, 90)
    print(f"after rm -f: {row.status}, attempt {row.attempt}, retries {row.retry_count}")
    assert row.status == Status.COMPLETED, row.last_error
    assert (row.attempt, row.retry_count) == (2, 1)
    assert "vanished" in row.last_error
    assert row.stdout_log.strip() == "second-run"


# -- a host whose daemon stops while its jobs run ------------------------------------------


@pytest.mark.celery
@pytest.mark.slow
def test_jobs_of_a_stopped_daemon_stay_running_and_end_with_their_real_outcome(
    broker_url: str, test_image: str, docker_client: Any
) -> None:
    with second_daemon(test_image, docker_client) as daemon:
        host = ExecutorHost.objects.create(
            name="second", connection_string=daemon.url, max_concurrent_jobs=4
        )
        jobs = [
            ContainerJob.objects.create_job(
                docker_image=test_image,
                # The output comes well after the daemon is back: what a container
                # prints while its daemon restarts is Docker's to lose, not ours.
                command=f"sh -c 'sleep 16; echo done-{code}; exit {code}'",
                docker_host=host,
                timeout_seconds=300,
            )
            for code in (0, 3)
        ]
        with celery_cluster(broker_url, LEASE_SECONDS=4, RECONCILE_INTERVAL=1.0) as cluster:
            cluster.worker("wa", concurrency=2)
            for job in jobs:
                job.delay()
            for job in jobs:
                wait_running(job)
            daemon.stop()
            # Several lease lengths and reconcile passes with the daemon gone.
            time.sleep(6)
            rows = [reload(job) for job in jobs]
            host.refresh_from_db()
            print(
                "daemon stopped: "
                + ", ".join(f"{r.status} attempt {r.attempt}" for r in rows)
                + f"; host unreachable since {host.unreachable_since}"
            )
            assert [r.status for r in rows] == [Status.RUNNING, Status.RUNNING]
            assert [r.attempt for r in rows] == [1, 1]
            assert host.unreachable_since is not None
            daemon.start()
            finals = [wait_final(job, 90) for job in jobs]
        host.refresh_from_db()
        print("daemon back: " + ", ".join(f"{r.status} exit {r.exit_code}" for r in finals))
        assert [(r.status, r.exit_code) for r in finals] == [
            (Status.COMPLETED, 0),
            (Status.FAILED, 3),
        ]
        assert [r.stdout_log.strip() for r in finals] == ["done-0", "done-3"]
        assert [r.attempt for r in finals] == [1, 1]
        assert host.unreachable_since is None
