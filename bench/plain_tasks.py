"""The baseline of the benchmarks: a plain Celery task that runs one container with docker-py.

This is what a project without the app would write: start the container, wait for it,
remove it. It keeps no database row, takes no claim and reads no logs, so it is the
cheapest honest way to run a container from Celery, and the product is measured against it.

The worker imports this module with ``--include bench.plain_tasks``; the task binds to
whatever Celery app is current there (the test suite's app), so it runs under exactly the
same Celery settings as the product's ``run_container_job``. :func:`run_container` is also
called directly, without Celery, as the floor of the dispatch benchmark.
"""

from __future__ import annotations

import os
import time
from typing import Any

import docker
from celery import shared_task

PLAIN_TASK = "bench.plain_run_container"
# Label on every container the baseline and the floor start; used to find leftovers.
BENCH_LABEL = "dcc.bench"

_clients: dict[int, docker.DockerClient] = {}


def docker_client() -> docker.DockerClient:
    """One client per process (a prefork child never reuses its parent's sockets)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        _clients.clear()
        client = _clients[pid] = docker.from_env()
    return client


def run_container(
    client: docker.DockerClient,
    image: str,
    command: list[str],
    name: str,
    labels: dict[str, str],
) -> tuple[float, int]:
    """Run one container to its end; (wall time right after it started, exit code)."""
    container = client.containers.run(
        image, command, detach=True, network_mode="none", name=name, labels=labels
    )
    started = time.time()
    status = container.wait()
    container.remove()
    return started, int(status.get("StatusCode", -1))


@shared_task(name=PLAIN_TASK)
def plain_run_container(
    image: str, command: list[str], name: str, labels: dict[str, str]
) -> dict[str, Any]:
    started, exit_code = run_container(docker_client(), image, command, name, labels)
    return {"started": started, "exit_code": exit_code}
