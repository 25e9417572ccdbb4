"""Remove containers of finished jobs and delete old finished job rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from ... import states
from ...conf import app_settings
from ...models import ContainerJob
from ...queue import queue_manager


class Command(BaseCommand):
    help = "Remove exited or orphaned job containers and delete final jobs older than --days."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help="Delete final jobs finished more than this many days ago "
            "(default: CLEANUP_AFTER_DAYS).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Only count.")
        parser.add_argument(
            "--keep-rows", action="store_true", help="Remove containers only, keep job rows."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = app_settings.CLEANUP_AFTER_DAYS if options["days"] is None else options["days"]
        if options["dry_run"]:
            cutoff = timezone.now() - timedelta(days=days)
            old = ContainerJob.objects.filter(status__in=states.FINAL, completed_at__lt=cutoff)
            self.stdout.write(f"dry run: {old.count()} job row(s) older than {days} days")
            return
        removed = queue_manager.remove_finished_containers()
        self.stdout.write(f"removed {removed} container(s)")
        if not options["keep_rows"]:
            deleted = queue_manager.cleanup_old_jobs(days)
            self.stdout.write(f"deleted {deleted} job row(s) older than {days} days")
