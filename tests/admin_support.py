"""What the job change form posts, for the admin tests."""

from __future__ import annotations

import itertools
from typing import Any

from django.contrib.auth.models import Permission
from django.test import Client

from django_container_celery.models import ContainerJob

_users = itertools.count()


def staff_client(user_model: Any, *codenames: str) -> Client:
    """A logged-in staff client holding exactly the given permissions of the app."""
    user = user_model.objects.create_user(
        username=f"staff{next(_users)}", password="pw", is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_container_celery", codename__in=codenames
        )
    )
    client = Client()
    client.force_login(user)
    return client


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
