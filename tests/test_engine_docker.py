"""The queue engine against the real Docker daemon and real worker processes.

The same behaviours as ``test_queue.py`` (which uses the in-memory executor), here with
the default executor factory, so every container is a real one in the daemon named by
``DEFAULT_DOCKER_HOST``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import docker
import docker.errors
import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.test import override_settings
from django.utils import timezone

from django_container_celery import states
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .concurrency import run_in_processes
from .conftest import containers_of

pytestmark = [pytest.mark.docker, pytest.mark.django_db]

JOB_LABEL = "dcc.job_id"


def app_settings_with(**overrides: Any) -> override_settings:
    """override_settings for CONTAINER_CELERY, merged over the test settings."""
    return override_settings(CONTAINER_CELERY={**settings.CONTAINER_CELERY, **overrides})


def keep_containers() -> override_settings:
    return app_settings_with(KEEP_CONTAINERS=True)


def remove_job_containers(client: Any, job_ids: set[str]) -> None:
    """Force-remove every container labelled with one of these job ids."""
    if not job_ids:
        return
    for entry in client.api.containers(all=True, filters={"label": JOB_LABEL}):
        if (entry.get("Labels") or {}).get(JOB_LABEL) in job_ids:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.remove_container(entry["Id"], force=True, v=True)


@pytest.fixture
def make_job(docker_client: Any, test_image: str) -> Iterator[Callable[..., ContainerJob]]:
    """Creates queued jobs; removes every container of those jobs after the test."""
    created: set[str] = set()

    def factory(command: str = "true", queue: bool = True, **fields: Any) -> ContainerJob:
        fields.setdefault("docker_image", test_image)
        fields.setdefault("timeout_seconds", 120)
        job = ContainerJob.objects.create_job(command=command, **fields)
        created.add(str(job.pk))
        if queue:
            job.mark_as_queued()
        return job

    yield factory
    remove_job_containers(docker_client, created)


def row(job: ContainerJob) -> ContainerJob:
    return ContainerJob.objects.get(pk=job.pk)


def drive(
    manager: JobQueueManager,
    max_concurrent: int,
    done: Callable[[], bool],
    timeout: float = 60,
) -> None:
    """Launch and harvest in a loop, as the queue-mode command does, until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "jobs did not finish in time"
        result = manager.launch_next_batch(max_concurrent=max_concurrent)
        assert result["errors"] == []
        manager.harvest_finished_jobs()
        time.sleep(0.05)


def harvest_until(
    manager: JobQueueManager, job: ContainerJob, statuses: set[str], timeout: float = 30
) -> ContainerJob:
    deadline = time.monotonic() + timeout
    while True:
        current = row(job)
        if current.status in statuses:
            return current
        assert time.monotonic() < deadline, f"job still {current.status} after {timeout}s"
        manager.harvest_finished_jobs()
        time.sleep(0.1)


def unfinished() -> int:
    return ContainerJob.objects.filter(status__in=states.WAITING | states.ACTIVE).count()


# -- priority, then FIFO --------------------------------------------------------------------


def test_capacity_one_starts_jobs_by_priority_then_fifo(
    make_job: Callable[..., ContainerJob],
) -> None:
    priorities = [20, 80, 50, 80, 20, 50, 80, 20, 50, 80]
    jobs = [make_job(priority=p) for p in priorities]
    manager = JobQueueManager(worker_id="prio-worker")

    drive(manager, max_concurrent=1, done=lambda: unfinished() == 0)

    rows = list(ContainerJob.objects.filter(pk__in=[j.pk for j in jobs]))
    assert {r.status for r in rows} == {Status.COMPLETED}
    expected = [r.pk for r in sorted(rows, key=lambda r: (-r.priority, r.queued_at))]
    started = [r.pk for r in sorted(rows, key=lambda r: r.started_at)]
    assert started == expected
    # Capacity one: each job started after the previous one had finished.
    ordered = sorted(rows, key=lambda r: r.started_at)
    for before, after in itertools.pairwise(ordered):
        assert before.completed_at <= after.started_at


# -- concurrency limits with several worker processes --------------------------------------


def _worker_loop(index: int, max_concurrent: int, deadline: float) -> dict[str, int]:
    """One OS process: launch and harvest until nothing is waiting or running."""
    manager = JobQueueManager(worker_id=f"proc-{index}")
    launched = harvested = 0
    errors: list[str] = []
    while time.time() < deadline:
        batch = manager.launch_next_batch(max_concurrent=max_concurrent)
        launched += batch["launched"]
        errors += batch["errors"]
        harvested += manager.harvest_finished_jobs()
        if unfinished() == 0:
            break
        time.sleep(0.02)
    if errors:
        raise AssertionError(f"launch errors in proc-{index}: {errors[:5]}")
    return {"launched": launched, "harvested": harvested}


class Sampler(threading.Thread):
    """Samples, until stopped, the jobs holding a slot (database) and the running containers
    of this test's jobs (Docker)."""

    def __init__(self, job_ids: set[str]) -> None:
        super().__init__(daemon=True)
        self.job_ids = job_ids
        self.halt = threading.Event()
        self.max_active = 0
        self.max_running_containers = 0
        self.max_per_host: Counter[str] = Counter()
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client = docker.DockerClient(base_url=settings.DOCKER_HOST, timeout=30)
        try:
            while not self.halt.is_set():
                self.sample(client)
                self.halt.wait(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            client.close()
            connection.close()

    def sample(self, client: Any) -> None:
        per_host = dict(
            ContainerJob.objects.filter(status__in=states.ACTIVE)
            .order_by()
            .values_list("assigned_host__name")
            .annotate(n=Count("pk"))
            .values_list("assigned_host__name", "n")
        )
        active = sum(per_host.values())
        running = client.api.containers(filters={"label": JOB_LABEL, "status": "running"})
        ours = [c for c in running if (c.get("Labels") or {}).get(JOB_LABEL) in self.job_ids]
        self.max_active = max(self.max_active, active)
        self.max_running_containers = max(self.max_running_containers, len(ours))
        for name, count in per_host.items():
            if name is not None:
                self.max_per_host[name] = max(self.max_per_host[name], count)
        self.samples += 1

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error


def containers_per_job(client: Any, job_ids: set[str]) -> Counter[str]:
    found = client.api.containers(all=True, filters={"label": JOB_LABEL})
    labels = [(c.get("Labels") or {}).get(JOB_LABEL) for c in found]
    return Counter(job_id for job_id in labels if job_id in job_ids)


def run_workers(processes: int, max_concurrent: int, job_ids: set[str], budget: float) -> Any:
    sampler = Sampler(job_ids)
    sampler.start()
    began = time.monotonic()
    try:
        results = run_in_processes(
            _worker_loop, processes, max_concurrent, time.time() + budget, timeout=budget + 30
        )
    finally:
        sampler.stop()
    return sampler, results, time.monotonic() - began


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_three_processes_never_exceed_global_limit(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    jobs = [make_job(command="true" if i % 2 else "echo hi") for i in range(200)]
    job_ids = {str(j.pk) for j in jobs}
    with keep_containers():
        sampler, results, elapsed = run_workers(3, 4, job_ids, budget=150)

    per_job = containers_per_job(docker_client, job_ids)
    statuses = Counter(ContainerJob.objects.values_list("status", flat=True))
    attempts = Counter(ContainerJob.objects.values_list("attempt", flat=True))
    print(
        f"\n3 processes, 200 jobs in {elapsed:.1f}s: statuses={dict(statuses)} "
        f"containers={sum(per_job.values())} jobs_with_one_container="
        f"{sum(1 for n in per_job.values() if n == 1)} max_active_db={sampler.max_active} "
        f"max_running_containers={sampler.max_running_containers} samples={sampler.samples} "
        f"per_process={results}"
    )
    assert statuses == {Status.COMPLETED: 200}
    assert attempts == {1: 200}
    assert per_job == dict.fromkeys(job_ids, 1)
    assert sum(r["launched"] for r in results) == 200
    assert sum(r["harvested"] for r in results) == 200
    assert sampler.samples > 10
    assert 1 <= sampler.max_active <= 4
    assert sampler.max_running_containers <= 4


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_three_processes_never_exceed_host_capacity(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    ExecutorHost.objects.create(
        name="one-slot", connection_string=settings.DOCKER_HOST, max_concurrent_jobs=1
    )
    ExecutorHost.objects.create(
        name="two-slots", connection_string=settings.DOCKER_HOST, max_concurrent_jobs=2
    )
    jobs = [make_job(command="sh -c 'sleep 0.2'") for _ in range(60)]
    job_ids = {str(j.pk) for j in jobs}
    with keep_containers():
        sampler, results, elapsed = run_workers(3, 10, job_ids, budget=150)

    per_job = containers_per_job(docker_client, job_ids)
    statuses = Counter(ContainerJob.objects.values_list("status", flat=True))
    used_hosts = Counter(ContainerJob.objects.values_list("assigned_host__name", flat=True))
    print(
        f"\n3 processes, 2 hosts, 60 jobs in {elapsed:.1f}s: statuses={dict(statuses)} "
        f"containers={sum(per_job.values())} max_per_host={dict(sampler.max_per_host)} "
        f"max_active_db={sampler.max_active} max_running_containers="
        f"{sampler.max_running_containers} jobs_per_host={dict(used_hosts)} per_process={results}"
    )
    assert statuses == {Status.COMPLETED: 60}
    assert set(ContainerJob.objects.values_list("attempt", flat=True)) == {1}
    assert per_job == dict.fromkeys(job_ids, 1)
    assert sampler.max_per_host["one-slot"] <= 1
    assert sampler.max_per_host["two-slots"] <= 2
    assert sampler.max_active <= 3
    assert sampler.max_running_containers <= 3
    assert set(used_hosts) == {"one-slot", "two-slots"}


# -- launch failures ---------------------------------------------------------------------------


def test_unreachable_daemon_retries_with_growing_backoff_then_fails(
    make_job: Callable[..., ContainerJob],
) -> None:
    host = ExecutorHost.objects.create(
        name="nowhere", connection_string="unix:///tmp/dcc-no-such.sock"
    )
    job = make_job(docker_host=host, retry_strategy="fast", max_retries=2)
    manager = JobQueueManager(worker_id="retry-worker")
    waits = []
    for expected_count in (1, 2):
        result = manager.launch_job_with_retry(job)
        job.refresh_from_db()
        assert result["success"] is False and result["retry_scheduled"] is True
        assert (job.status, job.retry_count) == (Status.RETRYING, expected_count)
        assert job.scheduled_for is not None and job.scheduled_for > timezone.now()
        assert job.claimed_by == "" and job.queue_status == "scheduled"
        waits.append((job.scheduled_for - job.last_error_at).total_seconds())
        # Not due yet: a launch now is refused and changes nothing.
        early = manager.launch_job_with_retry(job)
        assert early["success"] is False and early["retry_scheduled"] is False
        assert row(job).retry_count == expected_count
        time.sleep(max(0.0, (job.scheduled_for - timezone.now()).total_seconds()) + 0.05)
    assert waits[0] < waits[1]
    assert waits == pytest.approx([1.0, 2.0], abs=0.2)

    result = manager.launch_job_with_retry(job)
    job.refresh_from_db()
    assert result["success"] is False and result["retry_scheduled"] is False
    assert (job.status, job.retry_count, job.queue_status) == (Status.FAILED, 2, "launch_failed")
    assert "transient" in job.last_error
    assert re.search(r"connect|connection|api version", job.last_error, re.IGNORECASE)
    assert "transition" not in job.last_error.lower()
    assert job.execution_id == "" and job.launched_at is None


def test_missing_image_fails_at_once(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(docker_image="dcc-no-such-image:latest", max_retries=5)
    result = JobQueueManager(worker_id="w").launch_job_with_retry(job)
    job.refresh_from_db()
    assert result["success"] is False and result["retry_scheduled"] is False
    assert (job.status, job.retry_count, job.queue_status) == (Status.FAILED, 0, "launch_failed")
    assert "dcc-no-such-image" in job.last_error and "permanent" in job.last_error
    assert containers_of(docker_client, job.pk) == []


def test_missing_command_fails_for_good_and_leaves_no_container(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(command="no-such-binary --flag", max_retries=5)
    with keep_containers():
        result = JobQueueManager(worker_id="w").launch_job_with_retry(job)
    job.refresh_from_db()
    assert result["success"] is False and result["retry_scheduled"] is False
    assert (job.status, job.retry_count) == (Status.FAILED, 0)
    assert "no-such-binary" in job.last_error and "permanent" in job.last_error
    assert containers_of(docker_client, job.pk) == []


# -- timeouts, cancel, exit codes, logs -------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "kept"])
def test_timeout_kills_the_container_and_fails(
    make_job: Callable[..., ContainerJob], docker_client: Any, keep: bool
) -> None:
    job = make_job(command="sleep 30", timeout_seconds=2)
    manager = JobQueueManager(worker_id="w")
    with app_settings_with(KEEP_CONTAINERS=keep):
        assert manager.launch_job(job)["success"]
        began = time.monotonic()
        done = harvest_until(manager, job, {Status.FAILED}, timeout=20)
    elapsed = time.monotonic() - began
    assert 1.5 <= elapsed < 10
    assert "timed out after 2 seconds" in done.last_error
    assert done.retry_count == 0 and done.completed_at is not None
    left = containers_of(docker_client, job.pk)
    if keep:
        assert len(left) == 1 and left[0].status == "exited"
    else:
        assert left == []


def test_cancel_stops_a_running_container(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(command="sleep 30")
    manager = JobQueueManager(worker_id="w")
    assert manager.launch_job(job)["success"]
    [container] = containers_of(docker_client, job.pk)
    assert container.status == "running"

    job.refresh_from_db()
    began = time.monotonic()
    assert job.cancel() is True
    assert time.monotonic() - began < 10
    assert containers_of(docker_client, job.pk) == []
    assert row(job).status == Status.CANCELLED

    assert manager.harvest_finished_jobs() == 0
    later = row(job)
    assert (later.status, later.exit_code) == (Status.CANCELLED, None)
    assert job.cancel() is False


def test_retryable_exit_code_retries_under_the_next_attempt_name(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(
        command="sh -c 'exit 75'", retry_exit_codes=[75], max_retries=1, retry_strategy="fast"
    )
    manager = JobQueueManager(worker_id="w")
    with keep_containers():
        assert manager.launch_job(job)["success"]
        first = harvest_until(manager, job, {Status.RETRYING})
        assert (first.exit_code, first.retry_count, first.attempt) == (75, 1, 1)
        assert "retry_exit_codes" in first.last_error
        assert first.scheduled_for > timezone.now()

        time.sleep(max(0.0, (first.scheduled_for - timezone.now()).total_seconds()) + 0.05)
        assert manager.launch_job(first)["success"]
        assert row(job).attempt == 2
        final = harvest_until(manager, job, {Status.FAILED})
    assert (final.exit_code, final.retry_count, final.attempt) == (75, 1, 2)
    names = sorted(c.name for c in containers_of(docker_client, job.pk))
    assert names == [f"dcc-{job.pk}-a1", f"dcc-{job.pk}-a2"]
    attempts = sorted(c.labels["dcc.attempt"] for c in containers_of(docker_client, job.pk))
    assert attempts == ["1", "2"]


def test_logs_are_stored_truncated_keeping_the_tail(
    make_job: Callable[..., ContainerJob],
) -> None:
    job = make_job(command="sh -c 'seq 1 5000; echo oops >&2'")
    manager = JobQueueManager(worker_id="w")
    with app_settings_with(LOG_MAX_BYTES=1000):
        assert manager.launch_job(job)["success"]
        done = harvest_until(manager, job, {Status.COMPLETED})
    marker, kept = done.stdout_log.split("\n", 1)
    assert "truncated" in marker
    assert len(kept.encode()) == 1000
    assert kept.endswith("4999\n5000\n")
    assert "\n1\n" not in done.stdout_log
    assert done.stderr_log == "oops\n"


# -- rescue -------------------------------------------------------------------------------------


def test_rescue_adopts_a_dead_workers_container(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(command="sh -c 'sleep 3; echo survived'")
    with keep_containers():
        assert JobQueueManager(worker_id="dead").launch_job(job)["success"]
        ContainerJob.objects.filter(pk=job.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        rescuer = JobQueueManager(worker_id="rescuer")
        assert rescuer.rescue_stale_jobs() == 1
        adopted = row(job)
        assert (adopted.status, adopted.claimed_by, adopted.attempt) == (
            Status.RUNNING,
            "rescuer",
            1,
        )
        assert adopted.lease_expires_at > timezone.now()
        # The dead worker's harvest finds nothing of its own any more.
        assert JobQueueManager(worker_id="dead").harvest_finished_jobs() == 0
        done = harvest_until(rescuer, job, {Status.COMPLETED}, timeout=30)
    assert (done.exit_code, done.stdout_log, done.attempt) == (0, "survived\n", 1)
    assert len(containers_of(docker_client, job.pk)) == 1


def expire_lease(job: ContainerJob) -> None:
    ContainerJob.objects.filter(pk=job.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


def test_rescue_adopts_a_container_started_before_the_claim_was_recorded(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    from django_container_celery.executors import executor_for
    from django_container_celery.launching import build_spec

    make_job(command="sh -c 'sleep 1; echo once'")
    # The dead worker claimed the job and started its container, then died before it
    # could record the job as running.
    job = JobQueueManager(worker_id="dead").acquire_next_job()
    assert job is not None and job.status == Status.LAUNCHING
    container_id = executor_for(None).start(build_spec(job))
    expire_lease(job)

    rescuer = JobQueueManager(worker_id="rescuer")
    with keep_containers():
        assert rescuer.rescue_stale_jobs() == 1
        adopted = row(job)
        assert (adopted.status, adopted.attempt, adopted.claimed_by) == (
            Status.RUNNING,
            1,
            "rescuer",
        )
        assert adopted.execution_id == container_id
        done = harvest_until(rescuer, job, {Status.COMPLETED})
    assert done.stdout_log == "once\n"
    assert [c.id for c in containers_of(docker_client, job.pk)] == [container_id]


def test_rescue_harvests_a_container_that_exited_meanwhile(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(command="sh -c 'echo bye; exit 0'")
    assert JobQueueManager(worker_id="dead").launch_job(job)["success"]
    client_state = docker_client.api.wait(f"dcc-{job.pk}-a1", timeout=30)
    assert client_state["StatusCode"] == 0
    expire_lease(job)
    assert JobQueueManager(worker_id="rescuer").rescue_stale_jobs() == 1
    done = row(job)
    assert (done.status, done.stdout_log, done.attempt) == (Status.COMPLETED, "bye\n", 1)
    assert containers_of(docker_client, job.pk) == []


def test_rescue_retries_a_vanished_container(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    job = make_job(command="sleep 30", retry_strategy="fast")
    assert JobQueueManager(worker_id="dead").launch_job(job)["success"]
    docker_client.api.remove_container(f"dcc-{job.pk}-a1", force=True)
    expire_lease(job)
    assert JobQueueManager(worker_id="rescuer").rescue_stale_jobs() == 1
    left = row(job)
    assert (left.status, left.retry_count, left.claimed_by) == (Status.RETRYING, 1, "")
    assert "vanished" in left.last_error


# -- batches and scheduling ------------------------------------------------------------------


def test_one_bad_job_does_not_stop_the_batch(
    make_job: Callable[..., ContainerJob], docker_client: Any
) -> None:
    bad = make_job(docker_image="dcc-no-such-image:latest", priority=90)
    good = [make_job(command="sleep 30") for _ in range(3)]
    manager = JobQueueManager(worker_id="w")
    result = manager.launch_next_batch(max_concurrent=5)
    assert result["launched"] == 3
    assert len(result["errors"]) == 1 and str(bad.pk) in result["errors"][0]
    assert row(bad).status == Status.FAILED
    for job in good:
        assert row(job).status == Status.RUNNING
        [container] = containers_of(docker_client, job.pk)
        assert container.status == "running"


def test_scheduled_job_does_not_start_early(make_job: Callable[..., ContainerJob]) -> None:
    job = make_job(queue=False)
    when = timezone.now() + timedelta(seconds=1.5)
    job.mark_as_queued(scheduled_for=when)
    manager = JobQueueManager(worker_id="w")
    drive(manager, max_concurrent=5, done=lambda: row(job).status == Status.COMPLETED)
    done = row(job)
    assert done.started_at >= when
    assert (done.started_at - when).total_seconds() < 2
