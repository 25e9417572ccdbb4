"""List lanes, create or change one, and pause or resume them.

    manage.py container_lanes list
    manage.py container_lanes set NAME [--limit N | --no-limit] [--description TEXT]
    manage.py container_lanes pause NAME [NAME ...]
    manage.py container_lanes resume NAME [NAME ...]

Every change is checked whole before anything is written: an invalid value, or a name
that is not a lane, ends the command with an error and changes nothing.
"""

from __future__ import annotations

import getpass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from ... import lanes
from ...models import Lane

# Recorded as who paused a lane when the command cannot tell the system user.
COMMAND_NAME = "container_lanes"


class Command(BaseCommand):
    help = "List, create or change, pause and resume lanes."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        actions.add_parser(
            "list", help="Each lane with its limit, pause, jobs holding a slot and waiting."
        )
        setter = actions.add_parser("set", help="Create a lane, or change an existing one.")
        setter.add_argument("name", metavar="NAME")
        limit = setter.add_mutually_exclusive_group()
        limit.add_argument(
            "--limit", type=int, metavar="N", help="Jobs of the lane that may hold a slot at once."
        )
        limit.add_argument("--no-limit", action="store_true", help="Remove the lane's limit.")
        setter.add_argument("--description", metavar="TEXT", help="What the lane is for.")
        for name, what in (("pause", "Pause"), ("resume", "Resume")):
            switch = actions.add_parser(name, help=f"{what} these lanes.")
            switch.add_argument("names", nargs="+", metavar="NAME")
            if name == "pause":
                switch.add_argument(
                    "--by",
                    metavar="WHO",
                    help="Recorded as who paused them (default: the system user).",
                )

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "list":
            self._list()
        elif action == "set":
            self._set(options)
        elif action == "pause":
            self._pause(options["names"], options.get("by") or _system_user())
        else:
            self._resume(options["names"])

    def _list(self) -> None:
        rows = list(Lane.objects.order_by("name"))
        if not rows:
            self.stdout.write("no lanes")
            return
        counts = lanes.lane_counts([lane.name for lane in rows])
        for lane in rows:
            holding, waiting = counts.get(lane.name, (0, 0))
            self.stdout.write(describe(lane, holding, waiting))

    def _set(self, options: dict[str, Any]) -> None:
        name: str = options["name"]
        with transaction.atomic():
            lane = Lane.objects.select_for_update().filter(name=name).first()
            created = lane is None
            if lane is None:
                lane = Lane(name=name)
            before = (lane.max_concurrent_jobs, lane.description)
            if options["no_limit"]:
                lane.max_concurrent_jobs = None
            elif options["limit"] is not None:
                lane.max_concurrent_jobs = options["limit"]
            if options["description"] is not None:
                lane.description = options["description"]
            _check(lane)
            if created:
                lane.save()
            elif (lane.max_concurrent_jobs, lane.description) != before:
                lane.save(update_fields=["max_concurrent_jobs", "description", "updated_at"])
            else:
                self.stdout.write(f"lane {name}: unchanged ({_limit_text(lane)})")
                return
        verb = "created" if created else "updated"
        self.stdout.write(f"lane {name}: {verb} ({_limit_text(lane)})")

    def _pause(self, names: list[str], by: str) -> None:
        paused = _paused_by_name(names)
        to_pause = [name for name in paused if not paused[name]]
        if to_pause:
            lanes.pause(to_pause, by=by)
        for name, was_paused in paused.items():
            self.stdout.write(f"lane {name}: {'already paused' if was_paused else 'paused'}")
        if to_pause:
            self.stdout.write("their running jobs finish; none of their jobs starts until resumed")

    def _resume(self, names: list[str]) -> None:
        paused = _paused_by_name(names)
        to_resume = [name for name in paused if paused[name]]
        if to_resume:
            lanes.resume(to_resume)
        for name, was_paused in paused.items():
            self.stdout.write(f"lane {name}: {'resumed' if was_paused else 'not paused'}")


def describe(lane: Lane, holding: int, waiting: int) -> str:
    """One line: ``lane batch: limit 4, holding 2, waiting 10, paused since … by …``."""
    if lane.is_paused:
        since = lane.paused_at.isoformat(timespec="seconds") if lane.paused_at else "?"
        who = f" by {lane.paused_by}" if lane.paused_by else ""
        state = f"paused since {since}{who}"
    else:
        state = "not paused"
    return f"lane {lane.name}: {_limit_text(lane)}, holding {holding}, waiting {waiting}, {state}"


def _limit_text(lane: Lane) -> str:
    limit = lane.max_concurrent_jobs
    return "no limit" if limit is None else f"limit {limit}"


def _check(lane: Lane) -> None:
    """The model's validation; a CommandError naming each bad field, before any write."""
    try:
        lane.full_clean()
    except ValidationError as error:
        problems = [
            f"{_option(field)}: {' '.join(messages)}"
            for field, messages in error.message_dict.items()
        ]
        raise CommandError(f"lane {lane.name} not saved: {'; '.join(problems)}") from None


def _option(field: str) -> str:
    """The command's name for a model field, as the user typed it."""
    return {
        "max_concurrent_jobs": "--limit (max_concurrent_jobs)",
        "description": "--description",
        "name": "NAME",
    }.get(field, field)


def _paused_by_name(names: list[str]) -> dict[str, bool]:
    """Whether each named lane is paused, in the order given; a CommandError listing the
    names that are no lane, before anything changes."""
    wanted = list(dict.fromkeys(names))
    found = dict(Lane.objects.filter(name__in=wanted).values_list("name", "is_paused"))
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise CommandError(
            f"no lane named {', '.join(unknown)}; nothing changed "
            f"(create one with: manage.py container_lanes set NAME)"
        )
    return {name: found[name] for name in wanted}


def _system_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        return COMMAND_NAME
    return f"{user} ({COMMAND_NAME})"
