"""Container tasks of three priorities, for the canvas priority test (imported by the test
worker)."""

from __future__ import annotations

from django.conf import settings

from django_container_celery import container_task

IMAGE = str(getattr(settings, "TEST_IMAGE", "dcc-test-busybox:latest"))


@container_task(image=IMAGE, priority=80, max_retries=0, timeout_seconds=60)
def urgent_step(tag: str) -> str:
    return f"sh -c 'sleep 1; echo {tag}'"


@container_task(image=IMAGE, priority=50, max_retries=0, timeout_seconds=60)
def normal_step(tag: str) -> str:
    return f"sh -c 'sleep 1; echo {tag}'"


@container_task(image=IMAGE, priority=20, max_retries=0, timeout_seconds=60)
def low_step(tag: str) -> str:
    return f"sh -c 'sleep 1; echo {tag}'"
