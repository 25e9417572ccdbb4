"""The Celery app of the test suite, used in-process and by worker subprocesses."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("dcc_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.imports = (
    "django_container_celery.tasks",
    "tests.container_tasks",
    "tests.priority_tasks",
)


@app.on_after_configure.connect
def _schedule(sender: Celery, **kwargs: object) -> None:
    from django_container_celery.beat import beat_schedule

    sender.conf.beat_schedule = beat_schedule()
