"""What the engine needs from a container runtime, and nothing more.

An executor starts one container per job attempt, under a name the engine chooses, and
answers questions about containers by that name. It never touches the database.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol

from ..exceptions import ExecutorError

# Every job container carries these labels; cleanup and tests find containers by them.
JOB_LABEL = "dcc.job_id"
ATTEMPT_LABEL = "dcc.attempt"
# The id of the installation (its database) that started the container: sweeps and cleanup
# of one installation leave the containers of others on a shared daemon alone.
INSTALLATION_LABEL = "dcc.installation"


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
    # Asked between creating and starting the container: False means the caller's claim
    # moved on meanwhile (a launch too slow for its lease), so the container is removed
    # and never started. None: always start.
    may_start: Callable[[], bool] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class ContainerState:
    """What the runtime says about a container right now."""

    container_id: str
    running: bool
    exit_code: int | None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str = ""
    # The kernel killed the container (one of its processes) for memory: at its memory
    # limit, or because the host ran out. Only meaningful once it is not running.
    oom_killed: bool = False


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    """A container found by the app's labels (for cleanup and orphan detection)."""

    container_id: str
    name: str
    job_id: str
    attempt: int
    running: bool
    # "" for containers started before containers carried the installation label
    installation: str = ""


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


@dataclasses.dataclass(frozen=True)
class DaemonInfo:
    """What a runtime's machine offers: its memory (MiB) and CPU cores."""

    memory_mb: int
    cpus: float


class EventStream(Protocol):
    """An endless iterator of container events that another thread may close."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


# The events the watcher acts on: a container ended, was killed for memory, or was removed.
WATCHED_EVENTS = ("die", "oom", "destroy")


class ContainerExists(ExecutorError):
    """A container with the spec's name exists already: this attempt was started before.

    ``unstarted``: it was created and never started (its launcher died, or was too slow
    and lost the attempt); the caller may replace it while its claim holds.
    """

    def __init__(self, name: str, container_id: str = "", unstarted: bool = False) -> None:
        super().__init__(f"A container named {name} already exists")
        self.name = name
        self.container_id = container_id
        self.unstarted = unstarted


class StartFailed(ExecutorError):
    """The container was created but did not start. It is left in place: only the caller
    knows whether its claim still holds, and so whether the container is its to remove.

    ``gone``: the container no longer existed when it was to be started (someone removed
    it in between).
    """

    def __init__(
        self,
        message: str,
        name: str,
        container_id: str = "",
        gone: bool = False,
        original: BaseException | None = None,
    ) -> None:
        super().__init__(message, original=original)
        self.name = name
        self.container_id = container_id
        self.gone = gone


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

    def recent_logs(self, name: str, max_bytes: int, timeout: float) -> tuple[str, str]:
        """(stdout, stderr) for a person watching the container run: like :meth:`logs`,
        but read while someone waits, so a runtime should give up (raise
        :class:`ExecutorError`) after about ``timeout`` seconds and may read only the
        recent end of a long log. The default reads :meth:`logs`."""
        return self.logs(name, max_bytes)

    @abc.abstractmethod
    def stop(self, name: str, timeout: float = 5) -> None:
        """Stop the container (SIGTERM, then SIGKILL after ``timeout``); no error if gone."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Remove the container, forcing it if running; no error if gone."""

    def remove_unstarted(self, name: str) -> bool:
        """Remove the container only if it was created and never started; True if it is
        gone. A runtime without that state keeps the default: never."""
        return False

    @abc.abstractmethod
    def list_job_containers(self, installation: str | None = None) -> list[ContainerInfo]:
        """Every container, running or exited, that carries the app's job label; with
        ``installation``, only those whose installation label has that value."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the runtime answers; raise :class:`ExecutorError` if not."""

    def info(self) -> DaemonInfo:
        """The memory and CPU cores of the runtime's machine. Runtimes that cannot tell
        raise :class:`ExecutorError`, so a subclass written before this method still
        builds."""
        raise ExecutorError(f"{type(self).__name__} cannot report its memory and CPUs")

    def events(self, since: float | None = None) -> EventStream:
        """Stream :data:`WATCHED_EVENTS` of job containers from ``since`` (runtime time,
        seconds) on, or from now. Runtimes without an event feed raise
        :class:`ExecutorError`; the watcher then relies on its reconcile pass alone."""
        raise ExecutorError(f"{type(self).__name__} has no event stream")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def decode_log(data: bytes | bytearray | memoryview) -> str:
    """Text a PostgreSQL column can store, telling exactly which bytes were printed.

    Valid UTF-8 is decoded as it is. Each byte that is not part of valid UTF-8, and each
    NUL byte (which PostgreSQL text cannot hold), becomes the four characters ``\\xNN``:
    a backslash, ``x`` and the byte's value in two lowercase hex digits.
    """
    # str() decodes a buffer in place, without the copy that bytes(data) would make.
    text = str(data, "utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00")


# The first line of a tail read from the recent end of a log only (see LogTail.text), and
# either first line a tail may open with.
EARLIER_UNREAD_MARKER = "[... earlier output not read ...]\n"
CUT_MARKER_RE = re.compile(r"\A\[\.\.\. (?:\d+ bytes truncated|earlier output not read) \.\.\.\]\n")

# Bytes kept ahead of the tail, so that a UTF-8 character split by the cut can be told
# apart from stray continuation bytes (a character is at most 4 bytes).
_LOOKBACK = 3


class LogTail:
    """The last ``max_bytes`` bytes of a stream fed chunk by chunk, and a count of all.

    The buffer never holds more than twice ``max_bytes`` (plus a few bytes): once full, the
    tail that still matters is moved to its front in place, so memory stays bounded
    however much is fed, and each byte fed is copied at most twice. ``max_bytes <= 0``
    keeps everything.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.seen = 0
        self._buffer = bytearray()
        # Bytes of _buffer in use: once grown, the buffer is reused rather than resized,
        # because a bytearray trimmed at its front is copied whole when it next grows.
        self._size = 0
        self._ended = False

    def feed(self, chunk: bytes) -> None:
        self._check_open()
        self.seen += len(chunk)
        keep = self.max_bytes + _LOOKBACK
        with memoryview(chunk) as data:
            if self.max_bytes > 0 and len(data) >= keep:
                self._size = 0
                self._put(data[-keep:])
                return
            if self.max_bytes > 0 and self._size + len(data) > 2 * keep:
                with memoryview(self._buffer) as view:
                    view[:keep] = view[self._size - keep : self._size]
                self._size = keep
            self._put(data)

    def _put(self, data: memoryview) -> None:
        # Written through views: assigning a bytes object to a bytearray slice would copy
        # it first.
        room = min(len(self._buffer) - self._size, len(data))
        with memoryview(self._buffer) as view:
            view[self._size : self._size + room] = data[:room]
        self._buffer += data[room:]
        self._size += len(data)

    def text(self, *, earlier_unread: bool = False) -> str:
        """The tail as stored text (see :func:`decode_log`), behind a line
        ``[... N bytes truncated ...]`` when N bytes before it were dropped.

        ``earlier_unread``: the stream fed was only the recent end of a log, so output
        before it may exist that no count covers; the tail then follows
        :data:`EARLIER_UNREAD_MARKER` instead.

        Call it once, after the last chunk: it frees the buffer.
        """
        self._check_open()
        with memoryview(self._buffer) as whole, whole[: self._size] as view:
            start = 0
            if 0 < self.max_bytes < len(view):
                start = _next_char_start(view, len(view) - self.max_bytes)
            dropped = self.seen - (len(view) - start)
            kept = decode_log(view[start:])
        # Freed before the marker is joined on, so that the buffer, its text and the
        # joined copy are never all held at once.
        self._buffer, self._size, self._ended = bytearray(), 0, True
        if earlier_unread:
            return EARLIER_UNREAD_MARKER + kept
        return f"[... {dropped} bytes truncated ...]\n{kept}" if dropped else kept

    def _check_open(self) -> None:
        if self._ended:
            raise RuntimeError("this LogTail's text() was taken already")


def _next_char_start(data: memoryview, cut: int) -> int:
    """``cut``, moved past the continuation bytes of a UTF-8 character it splits, so the
    kept text does not open with the broken half of a character."""
    lead = cut
    while lead > max(0, cut - _LOOKBACK) and _is_continuation(data[lead]):
        lead -= 1
    if lead == cut or _is_continuation(data[lead]):
        return cut
    end = min(len(data), lead + _sequence_length(data[lead]))
    while cut < end and _is_continuation(data[cut]):
        cut += 1
    return cut


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _sequence_length(lead: int) -> int:
    """How many bytes the UTF-8 character opened by ``lead`` has (1 if none)."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 1


def truncate_tail(data: bytes, max_bytes: int) -> str:
    """The last ``max_bytes`` bytes of ``data`` as stored text, marking what was cut."""
    tail = LogTail(max_bytes)
    tail.feed(data)
    return tail.text()
