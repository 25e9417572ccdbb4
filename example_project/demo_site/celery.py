"""The project's Celery app: configured from Django settings (``CELERY_*`` names)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")

app = Celery("demo_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Finds django_container_celery.tasks and reports.tasks through INSTALLED_APPS.
app.autodiscover_tasks()


@app.on_after_configure.connect
def add_container_job_schedule(sender: Celery, **kwargs: object) -> None:
    # Celery's own file-based beat scheduler is enough for one machine. A deployment with
    # several beat candidates would use django-celery-beat and `setup_container_beat`.
    from django_container_celery.beat import beat_schedule

    sender.conf.beat_schedule = {**(sender.conf.beat_schedule or {}), **beat_schedule()}
