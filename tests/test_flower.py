"""Flower shows container jobs as ordinary Celery tasks: started while the container runs,
then succeeded or failed when the watcher finishes the job, with the job's own task id.
Flower listens on loopback only, behind basic authentication, as the monitoring guide says.
"""

from __future__ import annotations

import base64
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

CREDENTIALS = "dcc:flower-test-secret"


def fetch(url: str, auth: str = CREDENTIALS) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def fetch_json(url: str) -> Any:
    status, body = fetch(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def test_flower_shows_started_then_succeeded_or_failed(broker_url: str, test_image: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    node = f"w1@{socket.gethostname()}"

    with celery_cluster(broker_url) as cluster:
        flower = cluster.flower(port, basic_auth=CREDENTIALS)
        cluster.worker("w1", concurrency=1)  # started with -E: task events on

        def up() -> bool:
            assert flower.alive(), flower.log_tail()
            return fetch(f"{base}/healthcheck")[0] == 200

        wait_for(up, 60, interval=0.3, message="Flower did not answer")
        assert fetch(f"{base}/api/tasks", auth="")[0] == 401  # no credentials, no data
        # Flower is listening to events once the worker's heartbeats reach it.
        wait_for(
            lambda: f'flower_worker_online{{worker="{node}"}} 1.0' in fetch(f"{base}/metrics")[1],
            60,
            interval=0.5,
            message=f"Flower never saw {node} online:\n{flower.log_tail()}",
        )

        def state_of(task_id: str) -> str:
            return str(fetch_json(f"{base}/api/tasks").get(task_id, {}).get("state", ""))

        slow = ContainerJob.objects.create_job(
            docker_image=test_image, command="sh -c 'sleep 4; echo seen-by-flower'"
        )
        slow_result = slow.delay()
        wait_for(
            lambda: ContainerJob.objects.get(pk=slow.pk).status == Status.RUNNING, 60, interval=0.1
        )
        wait_for(lambda: state_of(slow_result.id) == "STARTED", 10, interval=0.2)
        seen_while_running = ContainerJob.objects.get(pk=slow.pk).status
        assert slow_result.get(timeout=60)["stdout"] == "seen-by-flower\n"
        wait_for(lambda: state_of(slow_result.id) == "SUCCESS", 30, interval=0.3)
        info = fetch_json(f"{base}/api/task/info/{slow_result.id}")

        failing = ContainerJob.objects.create_job(
            docker_image=test_image, command="sh -c 'exit 5'", max_retries=0
        )
        failed_result = failing.delay()
        wait_for(lambda: state_of(failed_result.id) == "FAILURE", 60, interval=0.3)
        failed_info = fetch_json(f"{base}/api/task/info/{failed_result.id}")

    print(f"Flower's task info for the succeeded job: {json.dumps(info, sort_keys=True)}")
    print(f"Flower's task info for the failed job: {json.dumps(failed_info, sort_keys=True)}")
    assert seen_while_running == Status.RUNNING
    for entry in (info, failed_info):
        assert entry["name"] == RUN_TASK
        assert entry["worker"] == node
    assert info["state"] == "SUCCESS" and str(slow.pk) in info["args"]
    assert "seen-by-flower" in info["result"]
    assert failed_info["state"] == "FAILURE" and "code 5" in failed_info["exception"]
