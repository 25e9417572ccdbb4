"""Test setup for the example project, as a project using the app would write it."""

# The project's Celery app must be the current one, so that eager mode applies to it.
from demo_site.celery import app  # noqa: F401

pytest_plugins = ["django_container_celery.testing"]
