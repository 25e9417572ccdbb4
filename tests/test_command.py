"""``process_container_jobs`` as a real OS process against the test database and Docker.

Each command runs in its own session; the tests signal only the processes they started,
by process id, and kill their process groups at the end if they are still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from django.utils import timezone

from django_container_celery import states
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from . import celery_support
from .celery_support import wait_for
from .conftest import containers_of

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
JOB_LABEL = "dcc.job_id"
METRICS_LINE = r"^\{.*\"queue_depth\".*\}$"


class CommandProcess(celery_support.Proc):
    """One ``process_container_jobs`` process, its output going to a file we can read live."""

    def __init__(self, name: str, args: list[str], overrides: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=celery_support.test_database_url(),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            DCC_SETTINGS_JSON=json.dumps(overrides),
        )
        env.pop("DCC_TEST_DATABASE", None)
        env.pop("DJANGO_SETTINGS_MODULE", None)
        argv = [
            sys.executable,
            "-m",
            "django",
            "process_container_jobs",
            "--settings=tests.settings",
        ]
        super().__init__(name, [*argv, *args], env)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def wait_for_output(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output, re.MULTILINE)
            if found:
                return found
            if not self.alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the command's output:\n{self.output}")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"command still running after {timeout}s:\n{self.output}"
            ) from None

    def cleanup(self) -> None:
        self.signal_group(signal.SIGKILL)
        self.stop()


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Callable[..., CommandProcess]]:
    started: list[CommandProcess] = []

    def start(*args: str, **overrides: Any) -> CommandProcess:
        proc = CommandProcess(f"command-{len(started)}", list(args), overrides)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.cleanup()


@pytest.fixture
def make_job(docker_client: Any, test_image: str) -> Iterator[Callable[..., ContainerJob]]:
    """Creates jobs (queued unless asked otherwise); removes their containers afterwards."""
    created: set[str] = set()

    def factory(command: str = "true", queue: bool = True, **fields: Any) -> ContainerJob:
        scheduled_for = fields.pop("scheduled_for", None)
        fields.setdefault("docker_image", test_image)
        fields.setdefault("timeout_seconds", 120)
        job = ContainerJob.objects.create_job(command=command, **fields)
        created.add(str(job.pk))
        if queue:
            job.mark_as_queued(scheduled_for=scheduled_for)
        return job

    yield factory
    for entry in docker_client.api.containers(all=True, filters={"label": JOB_LABEL}):
        if (entry.get("Labels") or {}).get(JOB_LABEL) in created:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                docker_client.api.remove_container(entry["Id"], force=True, v=True)


def row(job: ContainerJob) -> ContainerJob:
    return ContainerJob.objects.get(pk=job.pk)


def all_running(jobs: list[ContainerJob]) -> bool:
    return all(row(job).status == Status.RUNNING for job in jobs)


def test_once_runs_queued_jobs_to_completion(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
    docker_client: Any,
) -> None:
    jobs = [make_job(f"echo job-{n}") for n in range(5)]
    proc = command("--queue-mode", "--once", "--max-concurrent", "5", "--poll-interval", "0.2")
    assert proc.wait(90) == 0, proc.output
    for n, job in enumerate(jobs):
        done = row(job)
        assert (done.status, done.exit_code, done.stdout_log) == (
            Status.COMPLETED,
            0,
            f"job-{n}\n",
        )
        assert done.attempt == 1 and done.claimed_by == ""
        assert containers_of(docker_client, job.pk) == []
    assert "stopped cleanly" in proc.output


def test_dry_run_lists_ready_jobs_and_changes_nothing(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
    docker_client: Any,
) -> None:
    ready = [make_job(priority=p) for p in (20, 80, 50)]
    later = make_job(scheduled_for=timezone.now() + timedelta(hours=1))
    pending = make_job(queue=False)
    fields = ("status", "claimed_by", "attempt", "queued_at", "updated_at", "dispatched_at")
    before = list(ContainerJob.objects.order_by("pk").values_list(*fields))

    # Without --queue-mode a real run would queue pending jobs; a dry run must not.
    proc = command("--dry-run")
    assert proc.wait(60) == 0, proc.output
    out = proc.output
    assert "3 job(s) would be launched" in out
    listed = re.findall(r"^\s+([0-9a-f-]{36}) priority=(\d+)", out, re.MULTILINE)
    assert listed == [(str(j.pk), str(j.priority)) for j in (ready[1], ready[2], ready[0])]
    assert str(later.pk) not in out and str(pending.pk) not in out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert (metrics["ready_now"], metrics["scheduled_future"]) == (3, 1)

    assert list(ContainerJob.objects.order_by("pk").values_list(*fields)) == before
    for job in [*ready, later, pending]:
        assert containers_of(docker_client, job.pk) == []


@pytest.mark.slow
def test_sigterm_stops_claiming_and_waits_for_running_jobs(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
) -> None:
    jobs = [make_job("sh -c 'sleep 3; echo done'") for _ in range(2)]
    proc = command(
        "--queue-mode",
        "--max-concurrent",
        "5",
        "--poll-interval",
        "0.2",
        "--shutdown-timeout",
        "30",
        "--worker-id",
        "graceful",
    )
    wait_for(lambda: all_running(jobs), timeout=30, message="jobs did not start")
    proc.send(signal.SIGTERM)
    signalled = time.monotonic()
    proc.wait_for_output(r"received SIGTERM")
    time.sleep(0.6)  # longer than a round: a round begun before the signal has ended
    late = make_job("echo too-late")

    assert proc.wait(30) == 0, proc.output
    elapsed = time.monotonic() - signalled
    assert "stopped cleanly" in proc.output
    for job in jobs:
        done = row(job)
        assert (done.status, done.stdout_log, done.claimed_by) == (
            Status.COMPLETED,
            "done\n",
            "",
        )
    # It waited for the running jobs rather than leaving at once.
    assert elapsed >= 1.0
    late = row(late)
    assert (late.status, late.attempt, late.claimed_by) == (Status.QUEUED, 0, "")
    assert ContainerJob.objects.filter(status__in=states.ACTIVE).count() == 0


@pytest.mark.slow
def test_sigterm_past_shutdown_timeout_leaves_a_rescuable_job(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
    docker_client: Any,
) -> None:
    job = make_job("sleep 20")
    proc = command(
        "--queue-mode",
        "--poll-interval",
        "0.2",
        "--shutdown-timeout",
        "1",
        "--worker-id",
        "impatient",
    )
    wait_for(lambda: all_running([job]), timeout=30, message="job did not start")
    proc.send(signal.SIGTERM)
    signalled = time.monotonic()
    assert proc.wait(15) == 0, proc.output
    assert time.monotonic() - signalled < 8
    assert "still running" in proc.output

    left = row(job)
    # Held by the worker: its launch, or its watcher, which takes the running jobs' claims.
    assert (left.status, left.attempt) == (Status.RUNNING, 1)
    assert left.claimed_by in ("impatient", "watcher@impatient"), left.claimed_by
    assert left.lease_expires_at is not None and left.lease_expires_at > timezone.now()
    [container] = containers_of(docker_client, job.pk)
    assert container.status == "running"

    # Rescuable: once the lease expires another worker adopts the same container.
    ContainerJob.objects.filter(pk=job.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert JobQueueManager(worker_id="rescuer").rescue_stale_jobs() == 1
    adopted = row(job)
    assert (adopted.status, adopted.claimed_by, adopted.attempt) == (
        Status.RUNNING,
        "rescuer",
        1,
    )
    assert adopted.execution_id == container.id

    assert adopted.cancel() is True
    assert row(job).status == Status.CANCELLED
    assert containers_of(docker_client, job.pk) == []


def test_sigusr1_prints_metrics(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
) -> None:
    for _ in range(2):
        make_job(scheduled_for=timezone.now() + timedelta(hours=1))
    proc = command("--queue-mode", "--poll-interval", "2", "--verbose")
    # Signalled between two rounds (the busy case has its own test below).
    proc.wait_for_output(r"launched=0 finished=0")
    proc.send(signal.SIGUSR1)
    line = proc.wait_for_output(METRICS_LINE).group(0)
    assert json.loads(line) == {
        "launch_failed": 0,
        "queue_depth": 2,
        "ready_now": 0,
        "running": 0,
        "scheduled_future": 2,
    }
    assert proc.alive()  # SIGUSR1 only reports
    proc.send(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output
    assert "stopped cleanly" in proc.output


def test_sigusr1_during_a_busy_round_does_not_hang(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
) -> None:
    # With no pause between rounds the main thread is almost always inside a query when
    # the signal arrives; the report must still come, and the worker must go on.
    make_job(scheduled_for=timezone.now() + timedelta(hours=1))
    proc = command("--queue-mode", "--poll-interval", "0")
    proc.wait_for_output(r"processing jobs")
    for sent in range(1, 6):
        proc.send(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while len(re.findall(METRICS_LINE, proc.output, re.MULTILINE)) < sent:
            assert time.monotonic() < deadline, f"no report for SIGUSR1 #{sent}:\n{proc.output}"
            assert proc.alive(), proc.output
            time.sleep(0.05)
    proc.send(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output
    assert "stopped cleanly" in proc.output


@pytest.mark.slow
def test_three_commands_share_the_limit_and_start_each_job_once(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
    docker_client: Any,
) -> None:
    jobs = [make_job("echo hi") for _ in range(60)]
    job_ids = {str(job.pk) for job in jobs}
    procs = [
        command(
            "--queue-mode",
            "--max-concurrent",
            "3",
            "--poll-interval",
            "0.2",
            "--timeout",
            "100",
            "--worker-id",
            f"cmd-{n}",
            KEEP_CONTAINERS=True,
        )
        for n in range(3)
    ]
    began = time.monotonic()
    max_active = 0
    while ContainerJob.objects.exclude(status=Status.COMPLETED).exists():
        assert time.monotonic() - began < 100, "jobs did not finish in time"
        assert all(proc.alive() for proc in procs), [proc.output for proc in procs]
        max_active = max(max_active, ContainerJob.objects.filter(status__in=states.ACTIVE).count())
        time.sleep(0.02)
    elapsed = time.monotonic() - began
    # Done before the time limit: end them the graceful way.
    for proc in procs:
        proc.send(signal.SIGTERM)
    codes = [proc.wait(30) for proc in procs]

    found = docker_client.api.containers(all=True, filters={"label": JOB_LABEL})
    per_job = Counter(
        label
        for label in ((c.get("Labels") or {}).get(JOB_LABEL) for c in found)
        if label in job_ids
    )
    launched_by = [
        sum(int(n) for n in re.findall(r"launched=(\d+)", proc.output)) for proc in procs
    ]
    print(
        f"\n3 commands, 60 jobs in {elapsed:.1f}s: containers={sum(per_job.values())} "
        f"max_active_db={max_active} exit_codes={codes} launched_per_command={launched_by}"
    )
    assert codes == [0, 0, 0]
    assert all("stopped cleanly" in proc.output for proc in procs)
    assert per_job == dict.fromkeys(job_ids, 1)
    assert set(ContainerJob.objects.values_list("attempt", flat=True)) == {1}
    assert max_active <= 3
    assert sum(launched_by) == 60


@pytest.mark.celery
def test_a_job_queued_with_delay_and_run_by_the_command_has_its_celery_result(
    command: Callable[..., CommandProcess],
    make_job: Callable[..., ContainerJob],
    broker_url: str,
) -> None:
    from .celery_app import app

    good = make_job("sh -c 'echo via-command'", queue=False)
    bad = make_job("sh -c 'exit 4'", queue=False, max_retries=0)
    good_result, bad_result = good.delay(), bad.delay()  # nobody consumes these messages
    proc = command("--queue-mode", "--once", "--poll-interval", "0.2")
    assert proc.wait(60) == 0, proc.output
    assert row(good).status == Status.COMPLETED and row(bad).status == Status.FAILED
    assert app.AsyncResult(good_result.id).get(timeout=10)["stdout"] == "via-command\n"
    from django_container_celery.exceptions import ContainerJobFailed

    with pytest.raises(ContainerJobFailed, match="code 4"):
        app.AsyncResult(bad_result.id).get(timeout=10)
    with app.connection_for_write() as conn:
        app.control.purge(connection=conn)
