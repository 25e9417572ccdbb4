"""Flower shows container jobs as ordinary Celery tasks, named and with the job id."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from django_container_celery.api import RUN_TASK
from django_container_celery.models import ContainerJob
from django_container_celery.states import Status

from .celery_support import celery_cluster, free_port, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def fetch_json(url: str) -> Any:
    status, body = fetch(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def test_flower_lists_the_run_task_with_its_job_id(
    broker_url: str, test_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower 2 refuses its HTTP API without authentication unless told otherwise.
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    node = f"w1@{socket.gethostname()}"

    with celery_cluster(broker_url) as cluster:
        flower = cluster.flower(port)
        cluster.worker("w1", concurrency=1)  # started with -E: task events on

        def up() -> bool:
            assert flower.alive(), flower.log_tail()
            return fetch(f"{base}/healthcheck")[0] == 200

        wait_for(up, 60, interval=0.3, message="Flower did not answer")
        # Flower is listening to events once the worker's heartbeats reach it.
        wait_for(
            lambda: f'flower_worker_online{{worker="{node}"}} 1.0' in fetch(f"{base}/metrics")[1],
            60,
            interval=0.5,
            message=f"Flower never saw {node} online:\n{flower.log_tail()}",
        )

        job = ContainerJob.objects.create_job(
            docker_image=test_image, command="echo seen-by-flower", timeout_seconds=60
        )
        result = job.delay()
        assert result.get(timeout=60)["stdout"] == "seen-by-flower\n"
        task_id = result.id

        def listed() -> dict[str, Any] | None:
            tasks = fetch_json(f"{base}/api/tasks")
            task = tasks.get(task_id)
            return task if task and task.get("state") == "SUCCESS" else None

        task = wait_for(listed, 30, interval=0.5, message=f"task {task_id} not in /api/tasks")
        info = fetch_json(f"{base}/api/task/info/{task_id}")

    job.refresh_from_db()
    assert job.status == Status.COMPLETED and job.celery_task_id == task_id
    for entry in (task, info):
        assert entry["name"] == RUN_TASK
        assert entry["state"] == "SUCCESS"
        assert str(job.pk) in entry["args"]
        assert entry["worker"] == node
    assert task_id in (info.get("uuid"), info.get("task-id"))
    assert "seen-by-flower" in info["result"]
