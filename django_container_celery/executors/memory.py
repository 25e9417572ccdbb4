"""An in-process stand-in for Docker, so the engine can be tested fast and without a daemon.

Containers live in a dict keyed by name. What each one does is decided at start by a
programmable ``behaviour``; time is real (``time.monotonic``), so a container "runs" for
``runs_for`` seconds and ``wait`` really blocks, which lets the engine's follow loop, its
timeouts and its cancellation be exercised as they are against Docker.

A kill for memory is simulated two ways: a ``FakeRun`` that needs more ``memory_mb`` than
its spec allows is killed when it would have exited, and :meth:`MemoryExecutor.kill_for_memory`
kills a running container now. Either reads as Docker's (exit code 137, ``oom_killed``, and
an ``oom`` event before the ``die``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from ..exceptions import ExecutorError
from .base import (
    ATTEMPT_LABEL,
    INSTALLATION_LABEL,
    JOB_LABEL,
    ContainerEvent,
    ContainerExists,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    DaemonInfo,
    EventStream,
    Executor,
    StartFailed,
    truncate_tail,
)

__all__ = ["FakeRun", "MemoryExecutor"]


# The exit code Docker reports for a container killed by SIGKILL.
KILLED_EXIT_CODE = 137

# What the fake's machine reports unless a test sets ``daemon_info``: 8 GiB and 4 cores.
DEFAULT_DAEMON_INFO = DaemonInfo(memory_mb=8192, cpus=4.0)


@dataclasses.dataclass
class FakeRun:
    """What a fake container does: run for ``runs_for`` seconds, print, exit."""

    exit_code: int = 0
    # Bytes stand for output that is not valid UTF-8.
    stdout: str | bytes = ""
    stderr: str | bytes = ""
    # float("inf") runs until stopped or finished by hand.
    runs_for: float = 0.0
    # The most memory the fake's process takes, MiB. Started with a smaller memory limit
    # (the spec's memory_mb), the container is killed for memory when it would have
    # exited, as a real one that allocates past its limit. None: it fits any limit.
    memory_mb: int | None = None


def _raw(output: str | bytes) -> bytes:
    # surrogatepass: a lone surrogate in a test's text becomes invalid UTF-8 bytes, stored
    # by the same rule as a real container's, instead of failing the read.
    return output if isinstance(output, bytes) else output.encode("utf-8", "surrogatepass")


def exit_at_once(spec: ContainerSpec) -> FakeRun:
    """The default behaviour: succeed immediately, print nothing."""
    return FakeRun()


@dataclasses.dataclass
class _Container:
    container_id: str
    spec: ContainerSpec
    run: FakeRun
    started_monotonic: float
    started_at: datetime
    # Set when the exit is forced (finish, stop, kill_for_memory) instead of reached by
    # runs_for.
    forced_exit_code: int | None = None
    forced_finished_at: datetime | None = None
    forced_oom: bool = False

    @property
    def over_limit(self) -> bool:
        """Its run needs more memory than its limit allows: killed when it would exit."""
        need, limit = self.run.memory_mb, self.spec.memory_mb
        return need is not None and limit is not None and need > limit

    def seconds_left(self, now: float) -> float:
        """Seconds until the natural exit; 0 once exited."""
        if self.forced_exit_code is not None:
            return 0.0
        return max(0.0, self.started_monotonic + self.run.runs_for - now)

    def exit_code(self, now: float) -> int | None:
        if self.forced_exit_code is not None:
            return self.forced_exit_code
        if self.seconds_left(now) > 0:
            return None
        return KILLED_EXIT_CODE if self.over_limit else self.run.exit_code

    def oom_killed(self, now: float) -> bool:
        if self.forced_exit_code is not None:
            return self.forced_oom
        return self.over_limit and self.seconds_left(now) <= 0

    def state(self, now: float) -> ContainerState:
        code = self.exit_code(now)
        finished_at = None
        if code is not None:
            finished_at = self.forced_finished_at or (
                self.started_at + timedelta(seconds=self.run.runs_for)
            )
        return ContainerState(
            container_id=self.container_id,
            running=code is None,
            exit_code=code,
            started_at=self.started_at,
            finished_at=finished_at,
            oom_killed=self.oom_killed(now),
        )


class MemoryExecutor(Executor):
    """A thread-safe fake executor; program it through ``behaviour`` and ``start_error``.

    ``started`` lists the spec of every successful start, in order; ``stopped`` and
    ``removed`` list the names given to stop() and remove() that found a container.
    """

    def __init__(self, behaviour: Callable[[ContainerSpec], FakeRun] | None = None) -> None:
        self.behaviour: Callable[[ContainerSpec], FakeRun] = behaviour or exit_at_once
        self.start_error: BaseException | None = None
        # Set to make stop() fail, as a daemon that stopped answering would; each refused
        # stop is counted in stop_failures.
        self.stop_error: BaseException | None = None
        self.stop_failures = 0
        self.started: list[ContainerSpec] = []
        self.stopped: list[str] = []
        self.removed: list[str] = []
        # Set to make events() fail, as a runtime without an event feed would.
        self.events_error: BaseException | None = None
        # What info() reports, and an error to raise instead, as from an unreachable daemon.
        self.daemon_info = DEFAULT_DAEMON_INFO
        self.info_error: BaseException | None = None
        self._containers: dict[str, _Container] = {}
        # A Condition so that wait() wakes at once when finish/stop/remove change a container.
        self._changed = threading.Condition(threading.RLock())

    def __repr__(self) -> str:
        return f"<MemoryExecutor {len(self._containers)} containers>"

    def _find(self, name: str) -> _Container | None:
        """By name, or by id as Docker also accepts (full id or a unique prefix)."""
        container = self._containers.get(name)
        if container is not None or not name:
            return container
        matches = [c for c in self._containers.values() if c.container_id.startswith(name)]
        return matches[0] if len(matches) == 1 else None

    # -- Executor -------------------------------------------------------------------------

    def start(self, spec: ContainerSpec) -> str:
        with self._changed:
            error = self.start_error
            if error is not None:
                raise ExecutorError(str(error), original=error)
            existing = self._containers.get(spec.name)
            if existing is not None:
                raise ContainerExists(spec.name, existing.container_id)
            if spec.may_start is not None and not spec.may_start():
                raise StartFailed(f"Container {spec.name} not started: claim lost", spec.name)
            run = self.behaviour(spec)
            container = _Container(
                container_id=uuid.uuid4().hex + uuid.uuid4().hex,
                spec=spec,
                run=run,
                started_monotonic=time.monotonic(),
                started_at=datetime.now(UTC),
            )
            self._containers[spec.name] = container
            self.started.append(spec)
            self._changed.notify_all()
            return container.container_id

    def inspect(self, name: str) -> ContainerState | None:
        with self._changed:
            container = self._find(name)
            return None if container is None else container.state(time.monotonic())

    def wait(self, name: str, timeout: float) -> int | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            container = self._find(name)
            while True:
                if container is None or self._find(container.spec.name) is not container:
                    raise ExecutorError(f"Container {name} does not exist")
                now = time.monotonic()
                code = container.exit_code(now)
                if code is not None:
                    return code
                remaining = deadline - now
                if remaining <= 0:
                    return None
                self._changed.wait(min(remaining, container.seconds_left(now)))

    def logs(self, name: str, max_bytes: int) -> tuple[str, str]:
        with self._changed:
            container = self._find(name)
            if container is None:
                return "", ""
            run = container.run
        return (
            truncate_tail(_raw(run.stdout), max_bytes),
            truncate_tail(_raw(run.stderr), max_bytes),
        )

    def stop(self, name: str, timeout: float = 5) -> None:
        with self._changed:
            if self.stop_error is not None:
                self.stop_failures += 1
                raise ExecutorError(str(self.stop_error), original=self.stop_error)
            container = self._find(name)
            if container is None:
                return
            self.stopped.append(container.spec.name)
            if container.exit_code(time.monotonic()) is None:
                self._force_exit(container, KILLED_EXIT_CODE)

    def remove(self, name: str) -> None:
        with self._changed:
            container = self._find(name)
            if container is None:
                return
            self.removed.append(container.spec.name)
            del self._containers[container.spec.name]
            self._changed.notify_all()

    def list_job_containers(self, installation: str | None = None) -> list[ContainerInfo]:
        with self._changed:
            now = time.monotonic()
            result = []
            for name, container in self._containers.items():
                labels = container.spec.labels
                if JOB_LABEL not in labels:
                    continue
                if installation is not None and labels.get(INSTALLATION_LABEL) != installation:
                    continue
                try:
                    attempt = int(labels.get(ATTEMPT_LABEL) or 0)
                except ValueError:
                    attempt = 0
                result.append(
                    ContainerInfo(
                        container_id=container.container_id,
                        name=name,
                        job_id=labels[JOB_LABEL],
                        attempt=attempt,
                        running=container.exit_code(now) is None,
                        installation=labels.get(INSTALLATION_LABEL, ""),
                    )
                )
            return result

    def ping(self) -> None:
        return None

    def info(self) -> DaemonInfo:
        with self._changed:
            if self.info_error is not None:
                raise ExecutorError(str(self.info_error), original=self.info_error)
            return self.daemon_info

    def events(self, since: float | None = None) -> EventStream:
        with self._changed:
            if self.events_error is not None:
                raise ExecutorError(str(self.events_error), original=self.events_error)
        return _MemoryEventStream(self)

    # -- test helpers ---------------------------------------------------------------------

    def _force_exit(self, container: _Container, exit_code: int, oom: bool = False) -> None:
        container.forced_exit_code = exit_code
        container.forced_finished_at = datetime.now(UTC)
        container.forced_oom = oom
        self._changed.notify_all()

    def finish(self, name: str, exit_code: int = 0) -> None:
        """Make a running container exit now with ``exit_code``."""
        with self._changed:
            container = self._find(name)
            if container is None:
                raise KeyError(name)
            if container.exit_code(time.monotonic()) is None:
                self._force_exit(container, exit_code)

    def kill_for_memory(self, name: str) -> None:
        """Make a running container exit now as one the kernel killed for memory: exit
        code 137, ``oom_killed`` in its state, an ``oom`` event before its ``die``."""
        with self._changed:
            container = self._find(name)
            if container is None:
                raise KeyError(name)
            if container.exit_code(time.monotonic()) is None:
                self._force_exit(container, KILLED_EXIT_CODE, oom=True)

    def vanish(self, name: str) -> None:
        """Delete a container as if someone removed it behind the engine's back."""
        with self._changed:
            container = self._find(name)
            if container is None:
                raise KeyError(name)
            del self._containers[container.spec.name]
            self._changed.notify_all()

    def running_names(self) -> list[str]:
        """Names of the containers running now, sorted."""
        with self._changed:
            now = time.monotonic()
            return sorted(n for n, c in self._containers.items() if c.exit_code(now) is None)

    def names(self) -> list[str]:
        """Names of every container that exists now (running or exited), sorted."""
        with self._changed:
            return sorted(self._containers)

    def count_for_job(self, job_id: object) -> int:
        """How many containers were ever started for this job (removed ones included).

        Counted from ``started`` rather than from live containers, because the engine
        removes a container once it has harvested it.
        """
        wanted = str(job_id)
        with self._changed:
            return sum(1 for spec in self.started if spec.labels.get(JOB_LABEL) == wanted)

    def reset(self) -> None:
        """Forget every container and record, and restore the default behaviour."""
        with self._changed:
            self._containers.clear()
            self.started.clear()
            self.stopped.clear()
            self.removed.clear()
            self.behaviour = exit_at_once
            self.start_error = None
            self.stop_error = None
            self.daemon_info = DEFAULT_DAEMON_INFO
            self.info_error = None
            self._changed.notify_all()


class _MemoryEventStream:
    """Watches the fake's containers and reports exits and removals as Docker would.

    Exits reached by ``runs_for`` change no state, so the stream looks every 20 ms.
    """

    def __init__(self, executor: MemoryExecutor) -> None:
        self._executor = executor
        self._closed = threading.Event()
        with executor._changed:
            now = time.monotonic()
            # What exists now is the starting point: only later changes are events.
            self._alive = {
                c.container_id: c for c in executor._containers.values() if c.exit_code(now) is None
            }
            self._present = {c.container_id: c for c in executor._containers.values()}

    def __iter__(self) -> Iterator[ContainerEvent]:
        executor = self._executor
        while not self._closed.is_set():
            with executor._changed:
                executor._changed.wait(0.02)
                events = self._changes(time.monotonic())
            yield from events

    def _changes(self, now: float) -> list[ContainerEvent]:
        current = {c.container_id: c for c in self._executor._containers.values()}
        events: list[ContainerEvent] = []
        for container in current.values():
            if container.container_id not in self._present:
                self._present[container.container_id] = container
                self._alive[container.container_id] = container
        for cid, container in list(self._alive.items()):
            code = container.exit_code(now)
            if code is not None or cid not in current:
                del self._alive[cid]
                if code is not None and container.oom_killed(now):
                    # Docker reports the kernel's kill before the container's exit.
                    events.append(_event("oom", container, None))
                events.append(_event("die", container, code))
        for cid, container in list(self._present.items()):
            if cid not in current:
                del self._present[cid]
                events.append(_event("destroy", container, None))
        return events

    def close(self) -> None:
        self._closed.set()


def _event(action: str, container: _Container, exit_code: int | None) -> ContainerEvent:
    labels = container.spec.labels
    try:
        attempt = int(labels.get(ATTEMPT_LABEL) or 0)
    except ValueError:
        attempt = 0
    return ContainerEvent(
        action=action,
        name=container.spec.name,
        job_id=labels.get(JOB_LABEL, ""),
        attempt=attempt,
        time=time.time(),
        exit_code=exit_code,
    )
