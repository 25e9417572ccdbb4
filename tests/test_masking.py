"""A job's secret environment values never leave the app in clear: not in its Celery
result, its task events, the app's log lines nor ``ContainerJobFailed``; the row keeps them.

Results and events go to a private Redis started for this module, so nothing here reaches
the shared broker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_container_celery import masking, results, validators
from django_container_celery.admin import logs as admin_logs
from django_container_celery.exceptions import ContainerJobFailed
from django_container_celery.executors.memory import MemoryExecutor
from django_container_celery.masking import MASK, mask_data, mask_text, masked_exception
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.signals import attempt_ended
from django_container_celery.states import Status

from .celery_app import app
from .celery_support import RedisServer, celery_cluster, wait_for
from .conftest import containers_of

SECRET = "s3cr3t-value"
ENV = {"API_TOKEN": SECRET, "REGION": "eu-west-1"}


# -- the masking functions ---------------------------------------------------------------


def test_mask_text_masks_secret_values_of_four_characters_or_more() -> None:
    env = {**ENV, "DB_PASSWORD": "pw"}
    text = f"token={SECRET} password=pw region=eu-west-1"
    assert mask_text(text, env) == f"token={MASK} password=pw region=eu-west-1"
    assert mask_text(text, {}) == text


def test_a_secret_inside_another_is_masked_whole() -> None:
    env = {"API_KEY": "abcd", "API_SECRET": "xxabcdxx"}
    assert mask_text("xxabcdxx abcd", env) == f"{MASK} {MASK}"


def test_mask_data_masks_nested_text_and_secret_named_entries() -> None:
    value = {
        "stdout": f"{SECRET}\n",
        "items": [SECRET, 3, None],
        "environment": {"API_TOKEN": "abc", "REGION": "eu"},
    }
    assert mask_data(value, ENV) == {
        "stdout": f"{MASK}\n",
        "items": [MASK, 3, None],
        "environment": {"API_TOKEN": MASK, "REGION": "eu"},
    }


def test_the_admin_and_the_validators_use_the_shared_masking() -> None:
    assert validators.mask_environment is masking.mask_environment
    assert validators.is_secret_key is masking.is_secret_key and validators.MASK == MASK
    assert admin_logs.redact is masking.mask_text


@pytest.mark.django_db
def test_the_admin_shows_the_last_error_masked() -> None:
    from django.contrib import admin

    job = ContainerJob.objects.create(
        docker_image="busybox:latest",
        environment=ENV,
        last_error=f"rejected {SECRET}",
        status=Status.FAILED,
    )
    job_admin = admin.site._registry[ContainerJob]
    assert f"rejected {MASK}" in job_admin.current_error_shown(job)
    assert SECRET not in job_admin.current_error_shown(job)
    assert f"rejected {MASK}" in job_admin.error_summary(job)
    job.status = Status.COMPLETED
    assert f"rejected {MASK}" in job_admin.earlier_error_shown(job)
    assert SECRET not in job_admin.earlier_error_shown(job)


# -- log lines ---------------------------------------------------------------------------


def _raise_quoting_the_secret() -> None:
    try:
        raise ValueError(f"inner {SECRET}")
    except ValueError as inner:
        raise RuntimeError(f"outer {SECRET}") from inner


def test_a_masked_exception_logs_its_traceback_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("django_container_celery.test_masking")
    with caplog.at_level(logging.ERROR, logger=logger.name):
        try:
            _raise_quoting_the_secret()
        except RuntimeError as exc:
            logger.error("job: %s", mask_text(str(exc), ENV), exc_info=masked_exception(exc, ENV))
    assert SECRET not in caplog.text
    assert f"builtins.RuntimeError: outer {MASK}" in caplog.text
    assert f"builtins.ValueError: inner {MASK}" in caplog.text  # the cause, masked too
    assert "_raise_quoting_the_secret" in caplog.text  # the frames are kept


def test_an_exception_of_a_job_without_secrets_is_logged_as_it_is() -> None:
    exc = RuntimeError("nothing to hide")
    assert masked_exception(exc, {"REGION": "eu-west-1"}) is exc


@pytest.mark.django_db
def test_a_failed_launch_logs_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    executor = MemoryExecutor()
    executor.start_error = RuntimeError(f"invalid option --token={SECRET}")
    manager = JobQueueManager(executor_factory=lambda host: executor, worker_id="w-mask")
    job = ContainerJob.objects.create(
        docker_image="busybox:latest", command="true", environment=ENV, max_retries=0
    )
    job.mark_as_queued()
    with caplog.at_level(logging.DEBUG, logger="django_container_celery"):
        manager.launch_job_with_retry(job)
    job.refresh_from_db()
    assert job.status == Status.FAILED and SECRET in job.last_error  # the row keeps it
    assert caplog.records, "the failed launch logged nothing"
    assert SECRET not in caplog.text


# -- the Celery result and task events ----------------------------------------------------


@pytest.fixture(scope="module")
def private_broker() -> Iterator[str]:
    redis = RedisServer()
    redis.start()
    try:
        yield redis.url
    finally:
        redis.stop()


@pytest.fixture
def on_private_broker(private_broker: str) -> Iterator[str]:
    """Point this process's Celery app, and the app's event sender, at the private Redis."""
    results._forget_dispatcher()
    with celery_cluster(private_broker):
        yield private_broker
    results._forget_dispatcher()  # the next test sends on its own broker again


@contextmanager
def captured_events() -> Iterator[list[dict[str, Any]]]:
    """Every event published on the app's broker while inside, by a real event receiver."""
    events: list[dict[str, Any]] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listener = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listener.start()
        try:
            _wait_until_listening(events)
            yield events
        finally:
            receiver.should_stop = True
            listener.join(10)


def _wait_until_listening(events: list[dict[str, Any]]) -> None:
    # The receiver's queue exists only once it consumes: until then events are lost, so
    # probe until one comes back.
    probe = str(uuid.uuid4())
    with app.connection_for_write() as connection:
        dispatcher = app.events.Dispatcher(connection, enabled=True)
        try:
            deadline = time.monotonic() + 20
            while not any(event.get("uuid") == probe for event in events):
                assert time.monotonic() < deadline, "the event receiver never listened"
                dispatcher.send("dcc-probe", uuid=probe)
                time.sleep(0.2)
        finally:
            dispatcher.close()


def events_of(events: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [event for event in list(events) if event.get("uuid") == task_id]


def stored_bytes(task_id: str) -> str:
    """The result exactly as the result backend holds it."""
    raw = app.backend.get(app.backend.get_key_for_task(task_id))
    assert raw, f"no result stored for {task_id}"
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def ended_job(status: str, **fields: Any) -> ContainerJob:
    return ContainerJob.objects.create(
        docker_image="busybox:latest",
        command=f"sh -c 'echo {SECRET}'",
        environment=ENV,
        status=status,
        celery_task_id=str(uuid.uuid4()),
        **fields,
    )


def publish_and_capture(job: ContainerJob, event_type: str) -> dict[str, Any]:
    """Send the engine's attempt_ended for ``job``; the one task event it caused."""
    with captured_events() as events:
        for _receiver, outcome in attempt_ended.send_robust(sender=ContainerJob, job=job):
            assert not isinstance(outcome, Exception), outcome
        found = wait_for(lambda: events_of(events, job.celery_task_id), 20)
    assert [event["type"] for event in found] == [event_type]
    return dict(found[0])


@pytest.mark.django_db
def test_success_result_and_event_are_masked(on_private_broker: str) -> None:
    now = timezone.now()
    job = ended_job(
        Status.COMPLETED,
        exit_code=0,
        stdout_log=f"token={SECRET}\n",
        stderr_log=f"warning: {SECRET} expires soon\n",
        started_at=now - timedelta(seconds=2),
        completed_at=now,
    )
    event = publish_and_capture(job, "task-succeeded")
    value = app.AsyncResult(job.celery_task_id).get(timeout=10)
    assert value["stdout"] == f"token={MASK}\n"
    assert value["stderr"] == f"warning: {MASK} expires soon\n"
    assert SECRET not in stored_bytes(job.celery_task_id)
    assert SECRET not in json.dumps(event) and MASK in event["result"]
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.stdout_log == f"token={SECRET}\n"  # the row is not masked


@pytest.mark.django_db
@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
def test_failure_result_event_and_exception_are_masked(on_private_broker: str, status: str) -> None:
    job = ended_job(status, exit_code=3, last_error=f"container said: bad token {SECRET}")
    event = publish_and_capture(job, "task-failed")
    with pytest.raises(ContainerJobFailed) as info:
        app.AsyncResult(job.celery_task_id).get(timeout=10)
    assert SECRET not in str(info.value) and f"bad token {MASK}" in str(info.value)
    assert SECRET not in stored_bytes(job.celery_task_id)
    assert SECRET not in json.dumps(event) and MASK in event["exception"]
    assert SECRET not in str(results.failure_of(job))


@pytest.mark.django_db
def test_retrying_meta_and_event_are_masked(on_private_broker: str) -> None:
    job = ended_job(
        Status.RETRYING,
        retry_count=1,
        scheduled_for=timezone.now() + timedelta(minutes=1),
        last_error=f"connection refused for {SECRET}",
    )
    event = publish_and_capture(job, "task-retried")
    stored = app.AsyncResult(job.celery_task_id)
    assert stored.state == "RETRYING"
    assert stored.info["error"] == f"connection refused for {MASK}"
    assert SECRET not in stored_bytes(job.celery_task_id)
    assert SECRET not in json.dumps(event) and MASK in event["exception"]


# -- end to end, with a real worker and a real container ---------------------------------


@pytest.mark.celery
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_stores_and_announces_the_output_masked(
    private_broker: str, test_image: str, docker_client: Any
) -> None:
    results._forget_dispatcher()
    try:
        with celery_cluster(private_broker) as cluster:
            worker = cluster.worker("w-mask", concurrency=1)
            with captured_events() as events:
                job = ContainerJob.objects.create_job(
                    docker_image=test_image,
                    command="sh -c 'echo token=$API_TOKEN; echo seen $API_TOKEN >&2'",
                    environment=ENV,
                    timeout_seconds=120,
                )
                result = job.delay()
                value = result.get(timeout=90)
                wait_for(
                    lambda: any(
                        event["type"] == "task-succeeded" for event in events_of(events, result.id)
                    ),
                    20,
                    message="no task-succeeded event",
                )
                announced = events_of(events, result.id)
            assert value["stdout"] == f"token={MASK}\n"
            assert value["stderr"] == f"seen {MASK}\n"
            assert SECRET not in stored_bytes(result.id)
            # task-sent, -received, -started from Celery itself, task-succeeded from the app.
            assert SECRET not in json.dumps(announced)
            job.refresh_from_db()
            assert job.stdout_log == f"token={SECRET}\n"  # the row keeps the output as printed
            wait_for(lambda: containers_of(docker_client, job.pk) == [], 20, message="kept")
            assert SECRET not in worker.log_path.read_text(errors="replace")
    finally:
        results._forget_dispatcher()
