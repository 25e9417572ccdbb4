"""Install the app's periodic tasks in django-celery-beat (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from ...beat import install_periodic_tasks


class Command(BaseCommand):
    help = "Create or update the periodic tasks that dispatch, rescue and clean up container jobs."

    def handle(self, *args: Any, **options: Any) -> None:
        for name, action in install_periodic_tasks():
            self.stdout.write(f"{action:9} {name}")
