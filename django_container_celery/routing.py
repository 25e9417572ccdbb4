"""How a job's Celery message is addressed: queue, broker priority and task id.

Job priorities are 0-100, higher first. Brokers disagree on direction: RabbitMQ serves
higher numbers first (0-9 here, with ``x-max-priority`` 10 on the queue), while kombu's
Redis transport serves *lower* numbers first. The mapping below keeps "higher job priority
runs first" true on both.
"""

from __future__ import annotations

from typing import Any

from .conf import app_settings
from .models import ContainerJob

BROKER_LEVELS = 10


def priority_level(job_priority: int) -> int:
    """0..9, higher for more urgent jobs."""
    clamped = min(100, max(0, int(job_priority)))
    return int(clamped * (BROKER_LEVELS - 1) / 100 + 0.5)  # half up, not to even


def broker_priority(job_priority: int, broker_url: str) -> int:
    level = priority_level(job_priority)
    scheme = broker_url.split("://", 1)[0].lower()
    if scheme.startswith(("redis", "rediss", "sentinel")):
        return (BROKER_LEVELS - 1) - level
    return level


def queue_for(job: ContainerJob) -> str | None:
    """The Celery queue for the job's run task; None means Celery's default queue."""
    base = app_settings.TASK_QUEUE
    if app_settings.PER_HOST_QUEUES and job.docker_host_id is not None:
        host = job.docker_host
        return f"{base or 'dcc'}.{host.name}" if host is not None else base
    return base


def message_options(job: ContainerJob, broker_url: str) -> dict[str, Any]:
    options: dict[str, Any] = {"priority": broker_priority(job.priority, broker_url)}
    queue = queue_for(job)
    if queue:
        options["queue"] = queue
    return options
