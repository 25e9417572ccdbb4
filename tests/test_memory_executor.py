"""The in-memory fake executor behaves like a small, controllable Docker."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

from django_container_celery.exceptions import ExecutorError
from django_container_celery.executors import (
    ContainerExists,
    ContainerSpec,
    Executor,
    FakeRun,
    MemoryExecutor,
    executor_for,
    memory_executor,
    reset_memory_executor,
)

from .celery_support import wait_for


def spec_for(job: str = "job-1", attempt: int = 1) -> ContainerSpec:
    return ContainerSpec(
        name=f"dcc-{job}-a{attempt}",
        image="img:latest",
        command=["run"],
        environment={},
        labels={"dcc.job_id": job, "dcc.attempt": str(attempt)},
    )


def test_default_run_exits_zero_at_once() -> None:
    executor = MemoryExecutor()
    container_id = executor.start(spec_for())
    assert executor.wait("dcc-job-1-a1", timeout=1) == 0
    state = executor.inspect(container_id)
    assert state is not None
    assert (state.running, state.exit_code) == (False, 0)
    assert executor.logs("dcc-job-1-a1", 100) == ("", "")
    assert executor.started == [spec_for()]


def test_runs_for_keeps_it_running_then_exits() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(exit_code=4, stdout="x" * 50, runs_for=0.3))
    executor.start(spec_for())
    assert executor.running_names() == ["dcc-job-1-a1"]
    assert executor.wait("dcc-job-1-a1", timeout=0.05) is None
    began = time.monotonic()
    assert executor.wait("dcc-job-1-a1", timeout=5) == 4
    assert time.monotonic() - began < 1
    assert executor.running_names() == []
    stdout, _ = executor.logs("dcc-job-1-a1", 10)
    assert stdout.endswith("x" * 10) and "40 bytes truncated" in stdout


def test_finish_wakes_a_waiter() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf")))
    executor.start(spec_for())
    threading.Timer(0.1, executor.finish, args=("dcc-job-1-a1", 2)).start()
    assert executor.wait("dcc-job-1-a1", timeout=5) == 2


def test_stop_kills_with_137_and_remove_deletes() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf")))
    executor.start(spec_for())
    executor.stop("dcc-job-1-a1")
    assert executor.wait("dcc-job-1-a1", timeout=0) == 137
    executor.stop("dcc-job-1-a1")
    assert executor.wait("dcc-job-1-a1", timeout=0) == 137
    executor.remove("dcc-job-1-a1")
    executor.remove("dcc-job-1-a1")
    assert executor.inspect("dcc-job-1-a1") is None
    assert executor.stopped == ["dcc-job-1-a1", "dcc-job-1-a1"]
    assert executor.removed == ["dcc-job-1-a1"]


def test_a_run_needing_more_memory_than_its_limit_is_killed_for_it() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(memory_mb=24, exit_code=3))
    stream = executor.events()
    events: list[Any] = []
    reader = threading.Thread(target=lambda: events.extend(stream), daemon=True)
    reader.start()
    small = dataclasses.replace(spec_for("small"), memory_mb=16)
    roomy = dataclasses.replace(spec_for("roomy"), memory_mb=32)
    unlimited = spec_for("unlimited")
    for spec in (small, roomy, unlimited):
        executor.start(spec)
    states = {spec.name: executor.inspect(spec.name) for spec in (small, roomy, unlimited)}
    assert {name: (s.exit_code, s.oom_killed) for name, s in states.items() if s} == {
        small.name: (137, True),
        roomy.name: (3, False),
        unlimited.name: (3, False),
    }

    def seen_now() -> list[tuple[str, str]]:
        return [(e.action, e.name) for e in list(events)]

    # Each container's exit is its last event: once all three are seen, so is any kill.
    ended = {("die", spec.name) for spec in (small, roomy, unlimited)}
    wait_for(lambda: ended <= set(seen_now()), 5, interval=0.02, message="an exit was not reported")
    stream.close()
    reader.join(2)
    seen = seen_now()
    # Docker's order: the kernel's kill, then the container's exit.
    assert seen.index(("oom", small.name)) + 1 == seen.index(("die", small.name))
    assert {name for action, name in seen if action == "oom"} == {small.name}


def test_kill_for_memory_ends_a_running_container() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf")))
    executor.start(spec_for())
    executor.kill_for_memory("dcc-job-1-a1")
    assert executor.wait("dcc-job-1-a1", timeout=1) == 137
    state = executor.inspect("dcc-job-1-a1")
    assert state is not None and (state.running, state.oom_killed) == (False, True)
    executor.start(spec_for(attempt=2))
    executor.stop("dcc-job-1-a2")
    stopped = executor.inspect("dcc-job-1-a2")
    assert stopped is not None and (stopped.exit_code, stopped.oom_killed) == (137, False)
    with pytest.raises(KeyError):
        executor.kill_for_memory("nope")


def test_vanish_fails_a_waiter() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf")))
    executor.start(spec_for())
    threading.Timer(0.1, executor.vanish, args=("dcc-job-1-a1",)).start()
    with pytest.raises(ExecutorError):
        executor.wait("dcc-job-1-a1", timeout=5)
    assert executor.inspect("dcc-job-1-a1") is None
    assert executor.logs("dcc-job-1-a1", 10) == ("", "")


def test_same_name_is_refused_even_from_many_threads() -> None:
    executor = MemoryExecutor()
    outcomes: list[str] = []

    def start() -> None:
        try:
            executor.start(spec_for())
            outcomes.append("started")
        except ContainerExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["exists"] * 7 + ["started"]
    assert executor.count_for_job("job-1") == 1
    executor.start(spec_for(attempt=2))
    assert executor.count_for_job("job-1") == 2
    assert executor.count_for_job("job-2") == 0


def test_start_error_creates_nothing() -> None:
    executor = MemoryExecutor()
    cause = ConnectionError("daemon down")
    executor.start_error = cause
    with pytest.raises(ExecutorError) as caught:
        executor.start(spec_for())
    assert caught.value.original is cause
    assert executor.started == []
    assert executor.inspect("dcc-job-1-a1") is None
    executor.start_error = None
    executor.start(spec_for())


def test_list_job_containers() -> None:
    executor = MemoryExecutor(
        lambda spec: FakeRun(runs_for=0 if spec.labels["dcc.attempt"] == "2" else 60)
    )
    first = executor.start(spec_for("a", 1))
    executor.start(spec_for("b", 2))
    found = {info.name: info for info in executor.list_job_containers()}
    assert found["dcc-a-a1"].container_id == first
    assert (found["dcc-a-a1"].job_id, found["dcc-a-a1"].attempt) == ("a", 1)
    assert found["dcc-a-a1"].running is True
    assert found["dcc-b-a2"].running is False


def test_executor_for_memory_is_the_shared_fake(settings: Any) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "memory"}
    fake = reset_memory_executor()
    assert executor_for(None) is fake
    assert memory_executor() is fake
    assert reset_memory_executor() is not fake


def test_executor_for_dotted_path(settings: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    settings.CONTAINER_CELERY = {
        **settings.CONTAINER_CELERY,
        "EXECUTOR": "django_container_celery.executors.memory.MemoryExecutor",
    }
    executor = executor_for(None)
    assert isinstance(executor, MemoryExecutor)
    assert executor_for(None) is executor

    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "os.path.join"}
    with pytest.raises(ImproperlyConfigured):
        executor_for(None)
    assert issubclass(MemoryExecutor, Executor)
