"""Testing support: a pytest plugin for projects that define container tasks.

Enable it in your ``conftest.py``::

    pytest_plugins = ["django_container_celery.testing"]

Fixtures (all need pytest-django's database access):

``fake_containers``
    The in-memory executor in place of Docker, as a :class:`FakeContainers`: it records
    every container that would have run (image, command, environment, limits) and plays
    the exit code, output and duration you program per task. Jobs still go through the
    real engine: claim, launch, finishing, retries, timeouts.
``eager_containers``
    ``fake_containers`` plus Celery's ``task_always_eager`` on the current app, so
    ``delay()``, ``apply_async()`` and signatures (chains, groups) run their job in the
    test process and return a ready result. ``eta``/``countdown`` are ignored and retries
    happen at once (no back-off), as in Celery's eager mode; timeouts take their real time.
``container_worker``
    A real Celery worker, in a thread of the test process, for end-to-end tests. It runs
    on ``celery_app``, the test app of Celery's pytest plugin (which pytest-celery
    installs): an in-memory broker, not your project's ``CELERY_*`` settings; override
    ``celery_app`` or ``celery_config`` to change that. It consumes the queues the app's
    settings route run messages to, and runs the watcher that finishes jobs. It uses a
    transactional database (like ``live_server``), since its threads have their own
    connections. For real containers, keep the ``docker`` executor.

Helper: :func:`wait_for_job` waits until a job (or the job behind an ``AsyncResult``) is
final and returns its row.

What comes from where: Celery's own pytest plugin (loaded by pytest-celery) provides
``celery_app``, ``celery_config`` and the in-thread worker that ``container_worker``
starts; this plugin adds the in-memory Docker, the eager path through the engine, the
watcher that finishes jobs, and :func:`wait_for_job`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["FakeContainers", "Outcome", "wait_for_job"]


@dataclasses.dataclass
class Outcome:
    """What a fake container does: exit with ``exit_code`` after ``duration`` seconds,
    having printed ``stdout`` and ``stderr``. ``times``: for this many containers only,
    then the next matching outcome applies (None: for every one)."""

    exit_code: int = 0
    stdout: str | bytes = ""
    stderr: str | bytes = ""
    duration: float = 0.0
    times: int | None = None


class FakeContainers:
    """The in-memory executor, programmed per task, and what it was asked to run."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self._rules: list[tuple[Callable[[Any], bool], Outcome]] = []
        executor.behaviour = self._play

    def program(
        self,
        task: Any = None,
        *,
        exit_code: int = 0,
        stdout: str | bytes = "",
        stderr: str | bytes = "",
        duration: float = 0.0,
        times: int | None = None,
    ) -> None:
        """Set what the containers of ``task`` (a container task, or a job name; None:
        every container) do. Outcomes programmed later take precedence; one with
        ``times`` is used that many times and then gives way to the earlier ones."""
        outcome = Outcome(exit_code, stdout, stderr, duration, times)
        self._rules.insert(0, (self._matcher(task), outcome))

    @property
    def started(self) -> list[Any]:
        """Every container started, in order, as a ``ContainerSpec`` (``image``,
        ``command``, ``environment``, ``memory_mb``, ``cpus``, ``labels``, ...)."""
        return list(self.executor.started)

    def started_for(self, task: Any) -> list[Any]:
        """The containers started for ``task`` (a container task or a job name)."""
        matches = self._matcher(task)
        return [spec for spec in self.executor.started if matches(spec)]

    def _matcher(self, task: Any) -> Callable[[Any], bool]:
        if task is None:
            return lambda spec: True
        if isinstance(task, str):
            names = {task}
        else:
            # A task's jobs are named after it unless its options give them a name.
            names = {task.name, str(task.options.get("name") or task.name)}
        return lambda spec: _job_name(spec) in names

    def _play(self, spec: Any) -> Any:
        from .executors.memory import FakeRun

        for index, (matches, outcome) in enumerate(self._rules):
            if not matches(spec):
                continue
            if outcome.times is not None:
                outcome.times -= 1
                if outcome.times <= 0:
                    del self._rules[index]
            return FakeRun(outcome.exit_code, outcome.stdout, outcome.stderr, outcome.duration)
        return FakeRun()


def _job_name(spec: Any) -> str:
    from .executors.base import JOB_LABEL
    from .models import ContainerJob

    name = ContainerJob.objects.filter(pk=spec.labels[JOB_LABEL]).values_list("name", flat=True)
    return str(name.first() or "")


def wait_for_job(job_or_result: Any, timeout: float = 60.0, poll: float = 0.1) -> Any:
    """The job's row once it is final (completed, failed or cancelled).

    Takes a ``ContainerJob``, its id, the ``AsyncResult`` that ``delay()`` returned, or
    its task id. Raises ``TimeoutError`` naming the job's status when it is not final in
    time.
    """
    import uuid

    from django.db.models import Q

    from .models import ContainerJob

    if isinstance(job_or_result, ContainerJob):
        query = ContainerJob.objects.filter(pk=job_or_result.pk)
    elif hasattr(job_or_result, "id") and not isinstance(job_or_result, str | uuid.UUID):
        query = ContainerJob.objects.filter(celery_task_id=job_or_result.id)
    else:
        key = str(job_or_result)
        by_task = Q(celery_task_id=key)
        try:
            query = ContainerJob.objects.filter(Q(pk=uuid.UUID(key)) | by_task)
        except ValueError:
            query = ContainerJob.objects.filter(by_task)
    deadline = time.monotonic() + timeout
    while True:
        job = query.first()
        if job is not None and job.is_final:
            return job
        if time.monotonic() >= deadline:
            status = job.status if job is not None else "missing"
            raise TimeoutError(f"job {job_or_result} is still {status} after {timeout} s")
        time.sleep(poll)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def fake_containers(settings: Any, db: Any) -> Iterator[FakeContainers]:
    """The in-memory executor in place of Docker, programmable per task."""
    from .executors import clear_executor_cache, reset_memory_executor

    current = dict(getattr(settings, "CONTAINER_CELERY", None) or {})
    settings.CONTAINER_CELERY = {**current, "EXECUTOR": "memory"}
    clear_executor_cache()
    yield FakeContainers(reset_memory_executor())
    reset_memory_executor()
    clear_executor_cache()


@pytest.fixture
def eager_containers(fake_containers: FakeContainers) -> Iterator[FakeContainers]:
    """``fake_containers`` with Celery's ``task_always_eager`` on: jobs run in the test."""
    from celery import current_app

    conf = current_app.conf
    saved = conf.task_always_eager
    conf.task_always_eager = True
    try:
        yield fake_containers
    finally:
        conf.task_always_eager = saved


@pytest.fixture
def container_worker(celery_app: Any, transactional_db: Any) -> Iterator[Any]:
    """A real Celery worker in a thread of this process, with the app's watcher, for
    end-to-end tests. Yields the worker."""
    from celery.contrib.testing.worker import start_worker

    from . import tasks  # noqa: F401 - registers the run task the worker must know
    from .watching import Watcher

    watcher = Watcher(f"test-watcher@{id(celery_app)}")
    watcher.start()
    try:
        with start_worker(
            celery_app, pool="threads", perform_ping_check=False, queues=_run_queues()
        ) as worker:
            yield worker
    finally:
        watcher.stop()


def _run_queues() -> list[str] | None:
    """The queues run messages go to under the app's settings (None: Celery's default)."""
    from .conf import app_settings
    from .models import ExecutorHost

    base = app_settings.TASK_QUEUE
    queues = [base] if base else []
    if app_settings.PER_HOST_QUEUES:
        names = ExecutorHost.objects.values_list("name", flat=True)
        queues += [f"{base or 'dcc'}.{name}" for name in names]
    return queues or None
