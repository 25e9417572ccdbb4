"""container_task definitions used by the Celery tests (imported by the test worker)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from django_container_celery import container_task

IMAGE = str(getattr(settings, "TEST_IMAGE", "dcc-test-busybox:latest"))


@container_task(image=IMAGE, priority=80, max_retries=0, timeout_seconds=60)
def say(word: str) -> str:
    return f"echo {word}"


@container_task(image=IMAGE, max_retries=0, timeout_seconds=60)
def shout(previous: dict[str, Any]) -> str:
    return f"echo {previous['stdout'].strip()}-again"


@container_task(image=IMAGE, max_retries=0, timeout_seconds=60)
def shell_line(line: str) -> str:
    """The caller's line is the command, as is: a bad one fails the step in the worker."""
    return line
