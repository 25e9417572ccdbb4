"""The app's periodic tasks, for django-celery-beat or for Celery's own ``beat_schedule``.

With django-celery-beat's database scheduler, run ``manage.py setup_container_beat`` once
per deployment (it is idempotent). With Celery's file-based scheduler, merge
:func:`beat_schedule` into your app's configuration::

    app.conf.beat_schedule = {**app.conf.beat_schedule, **beat_schedule()}
"""

from __future__ import annotations

from typing import Any

from .conf import app_settings

DISPATCH_TASK = "django_container_celery.dispatch_ready_jobs"
RESCUE_TASK = "django_container_celery.rescue_stale_jobs"
CLEANUP_TASK = "django_container_celery.cleanup_old_jobs"


def periodic_tasks() -> dict[str, tuple[str, float]]:
    """{entry name: (task name, every N seconds)}, from the current settings."""
    return {
        "container-jobs: dispatch ready jobs": (
            DISPATCH_TASK,
            float(app_settings.DISPATCH_INTERVAL),
        ),
        "container-jobs: rescue stale jobs": (
            RESCUE_TASK,
            max(float(app_settings.DISPATCH_INTERVAL), app_settings.LEASE_SECONDS / 2),
        ),
        "container-jobs: clean up old jobs": (CLEANUP_TASK, 3600.0),
    }


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Entries for Celery's ``beat_schedule`` setting."""
    entries = {}
    for name, (task, every) in periodic_tasks().items():
        options: dict[str, Any] = {"expires": max(every, 1.0)}
        if app_settings.TASK_QUEUE:
            options["queue"] = app_settings.TASK_QUEUE
        entries[name] = {"task": task, "schedule": every, "options": options}
    return entries


def install_periodic_tasks() -> list[tuple[str, str]]:
    """Create or update the app's entries in django-celery-beat; [(name, action)].

    Running it again changes nothing unless the settings changed, so it is safe in a
    deployment script.
    """
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    results = []
    for name, (task, every) in periodic_tasks().items():
        seconds = max(1, round(every))
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=seconds, period=IntervalSchedule.SECONDS
        )
        queue = app_settings.TASK_QUEUE or None
        existing = PeriodicTask.objects.filter(name=name).first()
        if existing is None:
            PeriodicTask.objects.create(
                name=name, task=task, interval=interval, queue=queue, enabled=True
            )
            results.append((name, "created"))
        elif (existing.task, existing.interval_id, existing.queue) != (task, interval.pk, queue):
            existing.task = task
            existing.interval = interval
            existing.queue = queue
            existing.save()
            results.append((name, "updated"))
        else:
            results.append((name, "unchanged"))
    return results
