"""What the job change form posts, for the admin tests."""

from __future__ import annotations

from typing import Any

from django_container_celery.models import ContainerJob


def job_form_data(job: ContainerJob, environment: str, **changes: Any) -> dict[str, Any]:
    """The change form's fields for ``job`` as a browser sends them, with ``changes``."""
    data = {
        "name": job.name,
        "description": job.description,
        "docker_image": job.docker_image,
        "command": job.command,
        "working_directory": job.working_directory,
        "environment": environment,
        "bind_mounts": "[]",
        "memory_limit": "",
        "cpu_limit": "",
        "timeout_seconds": str(job.timeout_seconds),
        "docker_host": "",
        "priority": str(job.priority),
        "max_retries": str(job.max_retries),
        "retry_strategy": job.retry_strategy,
        "retry_exit_codes": "[]",
    }
    data.update(changes)
    return data
