"""What the engine needs from a container runtime, and nothing more.

An executor starts one container per job attempt, under a name the engine chooses, and
answers questions about containers by that name. It never touches the database.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

from ..exceptions import ExecutorError

# Every job container carries these labels; cleanup and tests find containers by them.
JOB_LABEL = "dcc.job_id"
ATTEMPT_LABEL = "dcc.attempt"


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start the container of one job attempt."""

    name: str
    image: str
    command: list[str] | None
    environment: dict[str, str]
    labels: dict[str, str]
    working_dir: str | None = None
    memory_mb: int | None = None
    cpus: float | None = None
    # (host path, container path, read only), already checked against the allow-list
    bind_mounts: tuple[tuple[str, str, bool], ...] = ()
    network_mode: str | None = None
    auto_pull: bool = False


@dataclasses.dataclass(frozen=True)
class ContainerState:
    """What the runtime says about a container right now."""

    container_id: str
    running: bool
    exit_code: int | None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    """A container found by the app's labels (for cleanup and orphan detection)."""

    container_id: str
    name: str
    job_id: str
    attempt: int
    running: bool


@dataclasses.dataclass(frozen=True)
class ContainerEvent:
    """One thing the runtime says happened to a job container (``die``, ``oom``,
    ``destroy``). ``time`` is the runtime's own timestamp in seconds, used to resume a
    broken stream where it stopped."""

    action: str
    name: str
    job_id: str
    attempt: int
    time: float
    exit_code: int | None = None


class EventStream(Protocol):
    """An endless iterator of container events that another thread may close."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


# The events the watcher acts on: a container ended, was killed for memory, or was removed.
WATCHED_EVENTS = ("die", "oom", "destroy")


class ContainerExists(ExecutorError):
    """A container with the spec's name exists already: this attempt was started before."""

    def __init__(self, name: str, container_id: str = "") -> None:
        super().__init__(f"A container named {name} already exists")
        self.name = name
        self.container_id = container_id


class Executor(abc.ABC):
    """A container runtime. Every method raises :class:`ExecutorError` on failure."""

    @abc.abstractmethod
    def start(self, spec: ContainerSpec) -> str:
        """Create and start the container; return its id.

        Raises :class:`ContainerExists` when the name is taken, so a second start of the
        same attempt is refused by the runtime itself. A container that was created but
        failed to start is removed before the error is raised.
        """

    @abc.abstractmethod
    def inspect(self, name: str) -> ContainerState | None:
        """The container's state, or None when no container has that name or id."""

    @abc.abstractmethod
    def wait(self, name: str, timeout: float) -> int | None:
        """Block up to ``timeout`` seconds; the exit code, or None if still running."""

    @abc.abstractmethod
    def logs(self, name: str, max_bytes: int) -> tuple[str, str]:
        """(stdout, stderr), each cut to its last ``max_bytes`` bytes."""

    @abc.abstractmethod
    def stop(self, name: str, timeout: float = 5) -> None:
        """Stop the container (SIGTERM, then SIGKILL after ``timeout``); no error if gone."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Remove the container, forcing it if running; no error if gone."""

    @abc.abstractmethod
    def list_job_containers(self) -> list[ContainerInfo]:
        """Every container, running or exited, that carries the app's job label."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the runtime answers; raise :class:`ExecutorError` if not."""

    def events(self, since: float | None = None) -> EventStream:
        """Stream :data:`WATCHED_EVENTS` of job containers from ``since`` (runtime time,
        seconds) on, or from now. Runtimes without an event feed raise
        :class:`ExecutorError`; the watcher then relies on its reconcile pass alone."""
        raise ExecutorError(f"{type(self).__name__} has no event stream")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def truncate_tail(data: bytes, max_bytes: int) -> str:
    """Decode the last ``max_bytes`` bytes of ``data``, marking what was cut."""
    if max_bytes <= 0 or len(data) <= max_bytes:
        return data.decode("utf-8", errors="replace")
    cut = len(data) - max_bytes
    return f"[... {cut} bytes truncated ...]\n" + data[cut:].decode("utf-8", errors="replace")
