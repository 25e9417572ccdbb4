"""List the executor hosts with their capacity and use, or read their capacity from their
daemons.

``--read-capacity`` asks each named host's daemon (every active host when no name is
given) for its memory and CPUs and stores them, less ``HOST_MEMORY_RESERVE_MB`` and
``HOST_CPU_RESERVE``, as the host's ``memory_capacity_mb`` and ``cpu_capacity``. A host
whose daemon does not answer keeps its values; the command then exits with an error once
every host was tried.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...exceptions import ExecutorError
from ...hosts import apply_capacity, cpu_use, memory_use
from ...models import ExecutorHost
from ...placement import HostRoom, host_rooms


class Command(BaseCommand):
    help = "List executor hosts with their capacity and use, or read capacity from daemons."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--read-capacity",
            nargs="*",
            metavar="NAME",
            default=None,
            help="Read memory and CPUs from the daemons of these hosts (all active hosts "
            "when no name is given) and store them as the hosts' capacity.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        names: list[str] | None = options["read_capacity"]
        if names is None:
            self._list()
        else:
            self._read_capacity(names)

    def _list(self) -> None:
        rooms = host_rooms()
        if not rooms:
            self.stdout.write("no executor hosts: jobs run on the default Docker host")
        for room in rooms:
            self.stdout.write(_describe(room))

    def _read_capacity(self, names: list[str]) -> None:
        failed = 0
        for host in _hosts_named(names):
            try:
                memory, cpus = apply_capacity(host)
            except ExecutorError as exc:
                failed += 1
                self.stderr.write(f"host {host.name}: capacity not read: {exc}")
                continue
            self.stdout.write(
                f"host {host.name}: memory_capacity_mb={memory} cpu_capacity={cpus:g}"
            )
        if failed:
            raise CommandError(f"{failed} host(s) could not be read")


def _hosts_named(names: list[str]) -> list[ExecutorHost]:
    """The hosts with these names, in the order given; every active host for no name."""
    if not names:
        return list(ExecutorHost.objects.filter(is_active=True).order_by("name"))
    found = {host.name: host for host in ExecutorHost.objects.filter(name__in=names)}
    unknown = [name for name in names if name not in found]
    if unknown:
        raise CommandError(f"no executor host named {', '.join(unknown)}")
    return [found[name] for name in dict.fromkeys(names)]


def _describe(room: HostRoom) -> str:
    state = "active" if room.active else "inactive"
    return (
        f"host {room.name} ({state}): slots {room.used_slots} / {room.slots}, "
        f"memory {memory_use(room)}, CPU {cpu_use(room)}"
    )
