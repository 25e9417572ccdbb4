"""Remove containers of finished jobs and delete old finished job rows.

Only this installation's containers are touched: those labelled with its id (see
``installation.py``). Containers from before that label existed could belong to any
installation sharing the daemon; ``--include-unlabelled`` takes them too. ``--dry-run``
prints the same lines but removes and deletes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...conf import app_settings
from ...installation import installation_id
from ...models import ContainerJob
from ...queue import Leftover, queue_manager

# Rows are deleted by primary key in batches of this size: each one is a short statement.
DELETE_BATCH = 500


class Command(BaseCommand):
    help = (
        "Remove exited or orphaned job containers of this installation and delete final "
        "jobs older than --days."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help="Delete final jobs finished more than this many days ago "
            "(default: CLEANUP_AFTER_DAYS).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List the containers and job rows that would go; change nothing.",
        )
        parser.add_argument(
            "--keep-rows", action="store_true", help="Remove containers only, keep job rows."
        )
        parser.add_argument(
            "--include-unlabelled",
            action="store_true",
            help="Also remove containers that carry no installation label (started by an "
            "older version). They may be another installation's: use it only when this "
            "installation is alone on its daemons.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run: bool = options["dry_run"]
        days = app_settings.CLEANUP_AFTER_DAYS if options["days"] is None else options["days"]
        self.stdout.write(f"installation {installation_id()}")
        containers = self._containers(dry_run, options["include_unlabelled"])
        rows = 0 if options["keep_rows"] else self._rows(dry_run, days)
        if dry_run:
            self.stdout.write(
                f"dry run: {containers} container(s) and {rows} job row(s) would be removed; "
                "nothing was changed"
            )

    def _containers(self, dry_run: bool, include_unlabelled: bool) -> int:
        leftovers = queue_manager.leftover_containers(include_unlabelled)
        if dry_run:
            for leftover in leftovers:
                self.stdout.write(f"would remove {_describe(leftover)}")
            return len(leftovers)
        removed = queue_manager.remove_leftovers(leftovers)
        for leftover in removed:
            self.stdout.write(f"removed {_describe(leftover)}")
        self.stdout.write(f"removed {len(removed)} container(s)")
        if len(removed) < len(leftovers):
            self.stdout.write(f"could not remove {len(leftovers) - len(removed)} container(s)")
        return len(removed)

    def _rows(self, dry_run: bool, days: int) -> int:
        old = queue_manager.old_jobs(days)
        listed = list(old.order_by("completed_at").values_list("pk", "status", "completed_at"))
        verb = "would delete" if dry_run else "deleting"
        for pk, status, completed_at in listed:
            self.stdout.write(f"{verb} job {pk} ({status}, finished {_when(completed_at)})")
        if dry_run:
            return len(listed)
        deleted = 0
        for start in range(0, len(listed), DELETE_BATCH):
            batch = [pk for pk, _status, _completed in listed[start : start + DELETE_BATCH]]
            # Still filtered as old: a row changed since it was listed stays.
            # Counted as jobs: their attempt rows are deleted with them.
            # Keys only: cascading to the attempt rows must not read the jobs' logs.
            gone = old.filter(pk__in=batch).only("pk").delete()[1]
            deleted += gone.get(ContainerJob._meta.label, 0)
        self.stdout.write(f"deleted {deleted} job row(s) older than {days} days")
        return deleted


def _describe(leftover: Leftover) -> str:
    info = leftover.info
    where = leftover.host.name if leftover.host is not None else "default host"
    state = "running" if info.running else "exited"
    return (
        f"container {info.name} (job {info.job_id or '?'}, attempt {info.attempt}, {state}, "
        f"on {where}): {leftover.reason}"
    )


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z") if moment is not None else "?"
