"""Containers killed for memory: recorded as such, retried with more memory when the job
asks for it (``memory_retry_factor``, capped by ``MAX_MEMORY_MB``), failed otherwise.

The first test runs a real container through the real watcher. Its command holds a string
of 12,000,000 bytes in a shell variable (command substitution of ``head -c`` piped through
``tr``, so the shell's read buffer grows to about twice that while it reads)::

    sh -c 'x=$(head -c 12000000 /dev/zero | tr "\\0" a); echo ${#x}'

Checked by hand on the test daemon (Docker 20.10.24, cgroup v1, storage vfs, no swap on
the host), ``docker run --network none -m Nm --memory-swap Nm dcc-test-busybox:latest``
with that command: killed at 14 to 22 MiB (exit code 137, ``State.OOMKilled`` true, an
``oom`` event just before the ``die``), printed 12000000 and exited 0 at 24 MiB and above,
five runs out of five at 16 and at 32 MiB. So a 16 MiB limit is killed and its retry at
32 MiB completes, with a margin either way.

The other tests use the in-memory executor, whose ``FakeRun(memory_mb=...)`` is killed for
memory when started with a smaller limit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from django_container_celery import finishing
from django_container_celery.executors import FakeRun, MemoryExecutor
from django_container_celery.executors.base import ContainerState
from django_container_celery.models import ContainerJob, ExecutorHost, JobAttempt
from django_container_celery.outcomes import End, Ending
from django_container_celery.queue import JobQueueManager
from django_container_celery.retry import get_retry_decision
from django_container_celery.states import Status
from django_container_celery.watching import Watcher

from .celery_support import wait_for

# Holds about 23 MiB at its peak: killed at 16 MiB, done at 32 (see the module docstring).
OOM_COMMAND = """sh -c 'x=$(head -c 12000000 /dev/zero | tr "\\0" a); echo ${#x}'"""
LIMIT = 16


def app_settings_with(**overrides: Any) -> override_settings:
    return override_settings(CONTAINER_CELERY={**settings.CONTAINER_CELERY, **overrides})


def attempts_of(job: ContainerJob) -> list[JobAttempt]:
    return list(JobAttempt.objects.filter(job_id=job.pk).order_by("attempt"))


def show(attempts: list[JobAttempt]) -> None:
    for row in attempts:
        error = f" error={row.error}" if row.error else ""
        print(
            f"attempt={row.attempt} reason={row.reason} memory_limit={row.memory_limit} "
            f"exit_code={row.exit_code}{error}"
        )


# -- a real container, through the real watcher -------------------------------------------


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_an_oom_killed_job_with_factor_two_completes_on_its_retry_with_twice_the_limit(
    docker_client: Any, test_image: str, made: list[Any]
) -> None:
    job = ContainerJob.objects.create_job(
        docker_image=test_image,
        command=OOM_COMMAND,
        memory_limit=LIMIT,
        memory_retry_factor=2,
        max_retries=1,
        retry_strategy="fast",
        timeout_seconds=120,
    )
    made.append(job)
    job.mark_as_queued()
    watcher = Watcher("oom-watcher", reconcile_interval=3600)  # events only, after the first
    watcher.start()
    try:
        wait_for(lambda: watcher.leading == {None}, 20, message="the watcher never led")
        # Kept, so that the daemon's own record of the first attempt can be read below.
        with app_settings_with(KEEP_CONTAINERS=True):
            manager = JobQueueManager(worker_id="oom-launcher")
            assert manager.launch_job(job)["success"]
            first = job.container_name
            wait_for(
                lambda: ContainerJob.objects.get(pk=job.pk).status == Status.RETRYING,
                60,
                message="the watcher did not record the kill for memory",
            )
            retrying = ContainerJob.objects.get(pk=job.pk)
            assert retrying.memory_limit == 2 * LIMIT
            assert f"retried with {2 * LIMIT} MiB" in retrying.last_error
            deadline = time.monotonic() + 60
            while ContainerJob.objects.get(pk=job.pk).attempt < 2:
                assert time.monotonic() < deadline, "the retry was never launched"
                assert manager.launch_next_batch(max_concurrent=1)["errors"] == []
                time.sleep(0.1)
            wait_for(
                lambda: ContainerJob.objects.get(pk=job.pk).is_final,
                60,
                message="the retry did not end",
            )
        oom_event_seen = first in watcher._oom_seen
    finally:
        watcher.stop()

    killed = docker_client.api.inspect_container(first)
    print(
        f"daemon: {first} State.OOMKilled={killed['State']['OOMKilled']} "
        f"ExitCode={killed['State']['ExitCode']} Memory={killed['HostConfig']['Memory']} "
        f"MemorySwap={killed['HostConfig']['MemorySwap']}; oom event seen={oom_event_seen}"
    )
    # No swap: the limit that held is the one recorded.
    assert killed["HostConfig"]["MemorySwap"] == killed["HostConfig"]["Memory"] == LIMIT << 20

    done = ContainerJob.objects.get(pk=job.pk)
    attempts = attempts_of(job)
    show(attempts)
    assert (done.status, done.attempt, done.retry_count) == (Status.COMPLETED, 2, 1)
    assert done.memory_limit == 2 * LIMIT
    assert done.stdout_log.strip() == "12000000"
    one, two = attempts
    assert (one.reason, one.memory_limit, one.exit_code) == ("out_of_memory", LIMIT, 137)
    assert one.retried
    assert f"killed at its {LIMIT} MiB memory limit" in one.error
    assert f"retried with {2 * LIMIT} MiB" in one.error
    assert (two.reason, two.memory_limit, two.exit_code) == ("exited", 2 * LIMIT, 0)


# -- the in-memory executor -----------------------------------------------------------------


def queued(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "allocate")
    fields.setdefault("retry_strategy", "fast")
    job = ContainerJob.objects.create_job(**fields)
    job.mark_as_queued()
    return job


def run_attempt(qm: JobQueueManager, job: ContainerJob) -> ContainerJob:
    """Launch the job's next attempt now and record how it ended."""
    ContainerJob.objects.filter(pk=job.pk, status=Status.RETRYING).update(
        scheduled_for=timezone.now()
    )
    job.refresh_from_db()
    assert qm.launch_job(job)["success"]
    assert qm.harvest_finished_jobs() == 1
    job.refresh_from_db()
    return job


@pytest.mark.django_db
def test_without_a_factor_an_oom_fails_and_is_not_retried(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(memory_mb=100, stdout="partial\n")
    job = run_attempt(qm, queued(memory_limit=LIMIT, max_retries=3))
    assert (job.status, job.retry_count, job.exit_code) == (Status.FAILED, 0, 137)
    assert job.last_error == (
        f"out of memory: the container was killed at its {LIMIT} MiB memory limit (exit code 137)"
    )
    assert job.stdout_log == "partial\n"  # logs are stored as for any exit
    (attempt,) = attempts_of(job)
    assert (attempt.reason, attempt.memory_limit, attempt.retried) == (
        "out_of_memory",
        LIMIT,
        False,
    )
    assert mem.names() == []  # removed as after any exit


@pytest.mark.django_db
def test_without_a_factor_an_oom_is_retried_with_the_same_memory_if_137_is_listed(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(memory_mb=100)
    job = run_attempt(qm, queued(memory_limit=LIMIT, max_retries=1, retry_exit_codes=[137]))
    assert (job.status, job.memory_limit) == (Status.RETRYING, LIMIT)
    assert "same memory" in job.last_error
    job = run_attempt(qm, job)
    assert (job.status, job.memory_limit) == (Status.FAILED, LIMIT)
    assert "no retries left" in job.last_error
    assert [a.memory_limit for a in attempts_of(job)] == [LIMIT, LIMIT]


@pytest.mark.django_db
def test_the_factor_is_capped_by_max_memory_mb(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(memory_mb=1000)
    with app_settings_with(MAX_MEMORY_MB=64):
        job = run_attempt(qm, queued(memory_limit=48, memory_retry_factor=2, max_retries=5))
        assert (job.status, job.memory_limit) == (Status.RETRYING, 64)  # not 96
        assert "retried with 64 MiB" in job.last_error
        job = run_attempt(qm, job)
    assert (job.status, job.memory_limit, job.retry_count) == (Status.FAILED, 64, 1)
    assert "killed at its 64 MiB memory limit" in job.last_error
    assert "MAX_MEMORY_MB caps it at 64 MiB" in job.last_error
    assert [(a.reason, a.memory_limit) for a in attempts_of(job)] == [
        ("out_of_memory", 48),
        ("out_of_memory", 64),
    ]
    assert [spec.memory_mb for spec in mem.started] == [48, 64]


@pytest.mark.django_db
def test_a_raised_limit_no_host_can_hold_is_not_retried(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    ExecutorHost.objects.create(name="small", memory_capacity_mb=48)
    mem.behaviour = lambda spec: FakeRun(memory_mb=1000)
    job = run_attempt(qm, queued(memory_limit=32, memory_retry_factor=2))
    assert (job.status, job.memory_limit) == (Status.FAILED, 32)
    assert "not retried with 64 MiB" in job.last_error
    assert "more than every host can hold (largest: 48 MiB)" in job.last_error


@pytest.mark.django_db
def test_the_budget_bounds_oom_retries(qm: JobQueueManager, mem: MemoryExecutor) -> None:
    mem.behaviour = lambda spec: FakeRun(memory_mb=1000)
    job = run_attempt(qm, queued(memory_limit=LIMIT, memory_retry_factor=1.5, max_retries=1))
    assert (job.status, job.memory_limit) == (Status.RETRYING, 24)
    job = run_attempt(qm, job)
    assert (job.status, job.memory_limit) == (Status.FAILED, 24)
    assert "no retries left (max_retries=1)" in job.last_error


@pytest.mark.django_db
def test_a_kill_without_a_memory_limit_blames_the_host(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(memory_retry_factor=2)
    assert qm.launch_job(job)["success"]
    mem.kill_for_memory(job.container_name)
    assert qm.harvest_finished_jobs() == 1
    job.refresh_from_db()
    assert job.status == Status.FAILED and job.memory_limit is None
    assert job.last_error.startswith(
        "out of memory: killed by the kernel with no memory limit set (the host ran out"
    )
    assert "memory_retry_factor needs a memory_limit" in job.last_error


@pytest.mark.django_db
def test_a_container_that_exits_zero_after_a_kill_for_memory_completed(
    qm: JobQueueManager, mem: MemoryExecutor
) -> None:
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    job = queued(memory_limit=LIMIT)
    assert qm.launch_job(job)["success"]
    mem.finish(job.container_name, 0)
    job.refresh_from_db()
    assert finishing.finish(job, mem, 0, out_of_memory=True)
    job.refresh_from_db()
    assert job.status == Status.COMPLETED
    assert [a.reason for a in attempts_of(job)] == ["exited"]


@pytest.mark.django_db
def test_the_decision_names_the_new_limit_in_its_changes() -> None:
    job = ContainerJob(memory_limit=100, memory_retry_factor=1.1, max_retries=1)
    decision = get_retry_decision(job, Ending(End.OUT_OF_MEMORY, exit_code=137))
    # 100 * 1.1 is 110.00000000000001 in floating point: still 110.
    assert decision.retry and decision.changes == {"memory_limit": 110}
    assert decision.reason == "retried with 110 MiB"
    exited = get_retry_decision(job, Ending(End.EXITED, exit_code=137))
    assert not exited.retry and exited.changes == {}


# -- the watcher's memory of oom events -----------------------------------------------------


class MissesOOMKilled(MemoryExecutor):
    """A daemon that reports the ``oom`` event but not ``State.OOMKilled`` (as some do
    under cgroup v2)."""

    def inspect(self, name: str) -> ContainerState | None:
        state = super().inspect(name)
        return None if state is None else dataclasses.replace(state, oom_killed=False)


@pytest.fixture
def watched() -> Iterator[tuple[MemoryExecutor, Watcher]]:
    mem = MissesOOMKilled()
    watcher = Watcher("oom-w", executor_factory=lambda host: mem, reconcile_interval=3600)
    watcher.start()
    try:
        wait_for(lambda: watcher.leading == {None}, 10, message="the watcher never led")
        yield mem, watcher
    finally:
        watcher.stop()


@pytest.mark.django_db(transaction=True)
def test_the_watcher_knows_a_kill_for_memory_from_the_oom_event(
    watched: tuple[MemoryExecutor, Watcher],
) -> None:
    mem, watcher = watched
    # Needs 24 MiB: killed when it would exit at 16, done at 32.
    mem.behaviour = lambda spec: FakeRun(memory_mb=24, runs_for=0.2, stdout="done\n")
    job = queued(memory_limit=LIMIT, memory_retry_factor=2, max_retries=1)
    manager = JobQueueManager(executor_factory=lambda host: mem, worker_id="launcher")
    assert manager.launch_job(job)["success"]
    first = job.container_name
    wait_for(
        lambda: ContainerJob.objects.get(pk=job.pk).status == Status.RETRYING,
        10,
        message="the kill for memory was not recorded",
    )
    assert first in watcher._oom_seen
    job.refresh_from_db()
    assert job.memory_limit == 2 * LIMIT
    ContainerJob.objects.filter(pk=job.pk).update(scheduled_for=timezone.now())
    assert manager.launch_next_batch(max_concurrent=1)["launched"] == 1
    wait_for(
        lambda: ContainerJob.objects.get(pk=job.pk).status == Status.COMPLETED,
        10,
        message="the retry did not complete",
    )
    attempts = attempts_of(job)
    show(attempts)
    assert [(a.reason, a.memory_limit, a.exit_code) for a in attempts] == [
        ("out_of_memory", LIMIT, 137),
        ("exited", 2 * LIMIT, 0),
    ]
    assert [spec.memory_mb for spec in mem.started] == [LIMIT, 2 * LIMIT]
