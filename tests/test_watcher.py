"""The watcher against the in-memory executor and the real database: leadership, the event
path and the reconcile pass. Real Celery workers and Docker are in test_detached.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from django_container_celery import watching
from django_container_celery.executors import FakeRun, MemoryExecutor
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status
from django_container_celery.watching import Watcher

from .celery_support import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def mem() -> MemoryExecutor:
    return MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf"), stdout="out\n"))


@pytest.fixture
def watchers(mem: MemoryExecutor) -> Iterator[Any]:
    started: list[Watcher] = []

    def start(name: str, reconcile_interval: float = 60.0) -> Watcher:
        # A pass runs when a watcher starts to lead; afterwards every reconcile_interval.
        watcher = Watcher(
            name, executor_factory=lambda host: mem, reconcile_interval=reconcile_interval
        )
        started.append(watcher)
        watcher.start()
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


def launched(mem: MemoryExecutor, **fields: Any) -> ContainerJob:
    job = ContainerJob.objects.create_job(docker_image="busybox:latest", command="run", **fields)
    job.mark_as_queued()
    manager = JobQueueManager(executor_factory=lambda host: mem, worker_id="launcher")
    assert manager.launch_job(job)["success"]
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    return job


def status_of(job: ContainerJob) -> str:
    return str(ContainerJob.objects.values_list("status", flat=True).get(pk=job.pk))


def test_an_exit_is_recorded_from_the_event_stream(mem: MemoryExecutor, watchers: Any) -> None:
    watcher = watchers("w1", reconcile_interval=3600)  # no reconcile pass after the first
    wait_for(lambda: watcher.leading == {None}, 10, message="the watcher never led")
    job = launched(mem)
    time.sleep(0.3)
    assert status_of(job) == Status.RUNNING
    began = time.monotonic()
    mem.finish(job.container_name, 0)
    wait_for(lambda: status_of(job) == Status.COMPLETED, 5, interval=0.01)
    took = time.monotonic() - began
    print(f"exit recorded {took * 1000:.0f} ms after it happened")
    done = ContainerJob.objects.get(pk=job.pk)
    assert done.stdout_log == "out\n" and done.exit_code == 0
    assert done.claimed_by == ""
    wait_for(lambda: mem.names() == [], 5, message="container not removed")


def test_the_reconcile_pass_catches_what_events_miss(mem: MemoryExecutor, watchers: Any) -> None:
    mem.events_error = RuntimeError("this runtime has no event feed")
    watcher = watchers("w1", reconcile_interval=0.3)
    wait_for(lambda: watcher.leading == {None}, 10, message="the watcher never led")
    ok, fails, vanishes, slow = (launched(mem, timeout_seconds=t) for t in (60, 60, 60, 1))
    mem.finish(ok.container_name, 0)
    mem.finish(fails.container_name, 3)
    mem.vanish(vanishes.container_name)
    wait_for(
        lambda: (
            [status_of(j) for j in (ok, fails, vanishes, slow)]
            == [Status.COMPLETED, Status.FAILED, Status.RETRYING, Status.FAILED]
        ),
        10,
        message="the reconcile pass did not end every attempt",
    )
    assert "timed out" in ContainerJob.objects.get(pk=slow.pk).last_error
    assert "vanished" in ContainerJob.objects.get(pk=vanishes.pk).last_error
    assert mem.running_names() == []


def test_the_leader_takes_the_running_jobs_and_renews_their_leases(
    mem: MemoryExecutor, watchers: Any
) -> None:
    job = launched(mem)
    first = ContainerJob.objects.get(pk=job.pk).lease_expires_at
    watcher = watchers("leader", reconcile_interval=0.2)
    wait_for(
        lambda: ContainerJob.objects.get(pk=job.pk).claimed_by == "leader",
        10,
        message="the leader did not take the running job",
    )
    wait_for(
        lambda: ContainerJob.objects.get(pk=job.pk).lease_expires_at > first,
        10,
        message="the lease was not renewed",
    )
    assert watcher.leading == {None}


def test_one_leader_at_a_time_and_a_standby_takes_over(mem: MemoryExecutor, watchers: Any) -> None:
    if connection.vendor != "postgresql":
        pytest.fail("leadership needs PostgreSQL; set DATABASE_URL", pytrace=False)
    first = watchers("first")
    wait_for(lambda: first.leading == {None}, 10, message="the first watcher never led")
    second = watchers("second")
    time.sleep(2.5)  # two leadership polls
    assert (first.leading, second.leading) == ({None}, set())

    job = launched(mem)
    first.stop()
    began = time.monotonic()
    wait_for(lambda: second.leading == {None}, 10, message="the standby never took over")
    print(f"standby led {time.monotonic() - began:.2f}s after the leader stopped")
    mem.finish(job.container_name, 0)
    wait_for(lambda: status_of(job) == Status.COMPLETED, 10, message="the new leader idled")


def test_rescue_leaves_a_watched_host_to_its_leader(mem: MemoryExecutor, watchers: Any) -> None:
    if connection.vendor != "postgresql":
        pytest.fail("leadership needs PostgreSQL; set DATABASE_URL", pytrace=False)
    watcher = watchers("leader")
    wait_for(lambda: watcher.leading == {None}, 10, message="the watcher never led")
    with watching.unwatched(None) as free:
        assert free is False
    watcher.stop()

    def free_now() -> bool:
        with watching.unwatched(None) as free:
            return free

    # The server releases a closed session's locks as its backend exits, a moment later.
    wait_for(free_now, 5, interval=0.05, message="the stopped watcher still leads")


def test_a_container_of_a_final_job_is_stopped(mem: MemoryExecutor, watchers: Any) -> None:
    job = launched(mem)
    # The row says cancelled but the container runs on (a stop that failed, say).
    ContainerJob.objects.filter(pk=job.pk).update(status=Status.CANCELLED, claimed_by="")
    assert mem.running_names() == [job.container_name]
    watchers("w1", reconcile_interval=0.2)
    wait_for(lambda: mem.running_names() == [], 10, message="the stray container still runs")
    assert job.container_name in mem.stopped


def test_another_installations_container_is_left_alone(mem: MemoryExecutor, watchers: Any) -> None:
    from django_container_celery.executors import ContainerSpec

    foreign = "dcc-00000000-0000-0000-0000-000000000001-a1"
    mem.start(
        ContainerSpec(
            name=foreign,
            image="busybox:latest",
            command=None,
            environment={},
            labels={"dcc.job_id": "00000000-0000-0000-0000-000000000001", "dcc.attempt": "1"},
        )
    )
    watchers("w1", reconcile_interval=0.2)
    time.sleep(1.0)
    assert mem.running_names() == [foreign]


def test_a_timeout_kill_that_fails_keeps_the_job_and_its_slot_until_it_succeeds(
    mem: MemoryExecutor, watchers: Any
) -> None:
    mem.stop_error = RuntimeError("daemon does not answer")
    job = launched(mem, timeout_seconds=1)
    watchers("w1", reconcile_interval=0.2)
    wait_for(lambda: mem.stop_failures >= 3, 15, message="no pass tried to kill it")
    assert status_of(job) == Status.RUNNING
    assert mem.running_names() == [job.container_name]
    assert ContainerJob.objects.holding_slots().count() == 1
    mem.stop_error = None
    wait_for(lambda: status_of(job) == Status.FAILED, 10, message="never killed")
    assert "timed out" in ContainerJob.objects.get(pk=job.pk).last_error
    assert mem.running_names() == []


def test_a_cancel_whose_stop_fails_keeps_the_slot_until_the_pass_stops_it(
    mem: MemoryExecutor, watchers: Any
) -> None:
    job = launched(mem)
    mem.stop_error = RuntimeError("daemon does not answer")
    manager = JobQueueManager(executor_factory=lambda host: mem, worker_id="operator")
    assert manager.cancel_job(ContainerJob.objects.get(pk=job.pk))
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.stop_pending) == (Status.CANCELLED, True)
    assert ContainerJob.objects.holding_slots().count() == 1
    refused = mem.stop_failures
    watchers("w1", reconcile_interval=0.2)
    wait_for(lambda: mem.stop_failures >= refused + 2, 15, message="no pass tried to stop it")
    assert mem.running_names() == [job.container_name]
    assert ContainerJob.objects.get(pk=job.pk).stop_pending
    mem.stop_error = None
    wait_for(
        lambda: not ContainerJob.objects.get(pk=job.pk).stop_pending,
        10,
        message="the slot was never given back",
    )
    assert mem.running_names() == []
    assert ContainerJob.objects.holding_slots().count() == 0


@pytest.fixture
def poisoned_rows() -> Iterator[None]:
    """A trigger that refuses to store any row whose output holds 'poison': finishing such
    a job fails on every try, as a row the database refuses would."""
    if connection.vendor != "postgresql":
        pytest.fail("this test needs PostgreSQL (set DATABASE_URL)")
    table = ContainerJob._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE OR REPLACE FUNCTION dcc_test_refuse_poison() RETURNS trigger AS $$
            BEGIN
                IF NEW.stdout_log LIKE '%%poison%%' THEN
                    RAISE EXCEPTION 'refusing this row';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql
            """
        )
        cursor.execute(
            f"CREATE TRIGGER dcc_test_poison BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION dcc_test_refuse_poison()"
        )
    yield
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER IF EXISTS dcc_test_poison ON {table}")
        cursor.execute("DROP FUNCTION IF EXISTS dcc_test_refuse_poison()")


def test_a_job_whose_finishing_keeps_failing_ends_failed(
    mem: MemoryExecutor, watchers: Any, poisoned_rows: None, settings: Any
) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "FINISH_TRIES": 3}
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"), stdout="poison\n")
    job = launched(mem)
    mem.finish(job.container_name, 0)
    watchers("w1", reconcile_interval=0.2)
    wait_for(lambda: status_of(job) == Status.FAILED, 15, message="still not final")
    row = ContainerJob.objects.get(pk=job.pk)
    print(f"ended {row.status}: {row.last_error}")
    assert "could not be finished after 3 tries" in row.last_error
    assert "refusing this row" in row.last_error
    assert row.claimed_by == "" and row.stdout_log == ""
