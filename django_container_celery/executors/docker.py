"""The executor that runs job containers in a Docker daemon, through the Docker SDK.

Every failure leaves as :class:`ExecutorError` whose ``original`` is the SDK, requests or
urllib3 exception object itself: the retry classifier decides transient versus permanent
from its type, so it must never be replaced by its text.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import docker
import docker.errors
import docker.tls
import requests.exceptions
import urllib3.exceptions

from ..exceptions import ExecutorError
from .base import (
    ATTEMPT_LABEL,
    INSTALLATION_LABEL,
    JOB_LABEL,
    WATCHED_EVENTS,
    ContainerEvent,
    ContainerExists,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    DaemonInfo,
    EventStream,
    Executor,
    LogTail,
    StartFailed,
)

if TYPE_CHECKING:
    from ..models import ExecutorHost

__all__ = ["DockerExecutor"]


# What a call to the daemon can raise: the SDK's own errors, requests' errors (connection
# refused, timeouts) and, from streamed responses, bare urllib3 or socket errors.
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)

# A read for a person watching (recent_logs) asks the daemon for the log's last entries,
# in a few requests whose window (the number of entries asked for) grows until each stream
# holds max_bytes. The daemon can only cut a log by entries (a line, or a piece of at most
# _ENTRY_MAX_BYTES of a longer one), and counts the entries of both streams even when it is
# asked for one stream only: such a request still makes it decode every entry of its window.
#
# The first window. Its answer costs at most 16 entries of 16 KiB whatever the container
# printed, and a log this short is read whole in one request.
_FIRST_WINDOW = 16
_ENTRY_MAX_BYTES = 16 * 1024
# A window grows at most this many times per request: the factor used when the last answer
# held nothing of a stream, so that no estimate of its bytes per entry exists.
_MAX_GROWTH = 16
# Bytes one read may receive in all, in multiples of max_bytes. The request that fills a
# stream asks for about a quarter more than max_bytes of it, those before it for less, and
# lines of uneven length may take one more: two streams need a few times max_bytes. A page
# polls every couple of seconds for as long as it is open, so a read stops there whatever
# the container printed; a stream not full by then keeps the last complete answer's tail.
_RECEIVE_BUDGET = 8
# Bytes the daemon may go through for one request for a single stream, in multiples of
# max_bytes (estimated from the bytes per entry seen so far, plus _ENTRY_OVERHEAD for what
# the daemon stores with each entry): 4 MiB for 64 KiB tails, a fraction of a second of a
# daemon's time, which is what a stream printed long before the other one may cost.
_SCAN_BUDGET = 64
_ENTRY_OVERHEAD = 100
# Each frame of a log without a TTY: stream (1 stdout, 2 stderr), 3 zero bytes, length.
_FRAME_HEADER = struct.Struct(">BxxxL")
_STDOUT, _STDERR = 1, 2

# Docker reports times with nanoseconds; datetime keeps microseconds.
_TIMESTAMP_RE = re.compile(r"^(?P<base>[^.]+?)(?:\.(?P<fraction>\d+))?(?P<zone>Z|[+-]\d\d:?\d\d)?$")


def parse_docker_time(value: str | None) -> datetime | None:
    """A timezone-aware datetime from Docker's timestamp, or None for its zero time."""
    if not value or value.startswith("0001-01-01"):
        return None
    match = _TIMESTAMP_RE.match(value.strip())
    if match is None:
        return None
    fraction = (match["fraction"] or "")[:6]
    zone = match["zone"] or "Z"
    text = match["base"] + (f".{fraction.ljust(6, '0')}" if fraction else "")
    text += "+00:00" if zone == "Z" else zone
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def daemon_info_from(data: Any) -> DaemonInfo:
    """The machine's memory and cores from the answer of ``docker info``."""
    try:
        memory_bytes = int(data["MemTotal"])
        cpus = float(data["NCPU"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExecutorError(
            f"Docker info gave no usable MemTotal and NCPU: {exc!r}", original=exc
        ) from exc
    if memory_bytes <= 0 or cpus <= 0:
        raise ExecutorError(f"Docker info reports MemTotal={memory_bytes} and NCPU={cpus:g}")
    return DaemonInfo(memory_mb=memory_bytes // (1024 * 1024), cpus=cpus)


def _is_read_timeout(exc: BaseException) -> bool:
    # requests raises ReadTimeout when the response headers are late, but a late body (the
    # wait endpoint sends its headers at once) comes out as a ConnectionError wrapping
    # urllib3's ReadTimeoutError.
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args)
    return isinstance(exc, urllib3.exceptions.ReadTimeoutError)


def _status_code(exc: BaseException) -> int | None:
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code
        return status if isinstance(status, int) else None
    return None


class DockerExecutor(Executor):
    """Runs containers in one Docker daemon.

    The client is created on first use: building an executor for a daemon that is down
    succeeds, and the failure surfaces from the first call, where the engine can classify
    and retry it.
    """

    def __init__(
        self,
        base_url: str,
        tls: docker.tls.TLSConfig | None = None,
        timeout: float = 60,
    ) -> None:
        self.base_url = base_url
        self.tls = tls
        self.timeout = timeout
        # Set by for_host so that a bad certificate path fails a call, not the constructor.
        self._tls_factory: Callable[[], docker.tls.TLSConfig | None] | None = None
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        # Containers this executor started itself: a zero exit from their wait is real.
        self._started: set[str] = set()
        # The client of recent_logs(), with its short timeout; built on first use.
        self._quick: DockerExecutor | None = None

    @classmethod
    def for_host(cls, host: ExecutorHost) -> DockerExecutor:
        """An executor for an ``ExecutorHost`` row, with its TLS options."""
        executor = cls(host.connection_string)
        if host.tls_enabled:
            # Copied now so that later edits to the row do not change this executor.
            cert, key = host.tls_client_cert, host.tls_client_key
            ca_cert, verify = host.tls_ca_cert, host.tls_verify

            def build_tls() -> docker.tls.TLSConfig:
                return docker.tls.TLSConfig(
                    client_cert=(cert, key) if cert and key else None,
                    ca_cert=ca_cert or None,
                    verify=verify,
                )

            executor._tls_factory = build_tls
        return executor

    def __repr__(self) -> str:
        return f"<DockerExecutor {self.base_url}>"

    # -- connection -----------------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        """The SDK client, connecting on first use; raises :class:`ExecutorError`."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                try:
                    tls = self._tls_factory() if self._tls_factory is not None else self.tls
                    # The API version is negotiated here (one request), so this is where
                    # an unreachable daemon is first noticed.
                    client = docker.DockerClient(
                        base_url=self.base_url, tls=tls, timeout=self.timeout
                    )
                    # Job containers never have a TTY, and the SDK's logs() inspects the
                    # container before every read only to learn that: one request saved
                    # per read. (If the SDK renames the hook, reads just inspect again.)
                    client.api._check_is_tty = _never_tty
                    self._client = client
                except _CLIENT_ERRORS as exc:
                    raise ExecutorError(
                        f"Cannot connect to Docker at {self.base_url}: {exc}", original=exc
                    ) from exc
            return self._client

    @property
    def api(self) -> Any:
        """The low-level API client: one HTTP request per call."""
        return self.client.api

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except _CLIENT_ERRORS as exc:
            raise ExecutorError(f"Docker {action} failed: {exc}", original=exc) from exc

    def ping(self) -> None:
        with self._translate("ping"):
            self.client.ping()

    def info(self) -> DaemonInfo:
        with self._translate("info"):
            data = self.client.info()
        return daemon_info_from(data)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            quick, self._quick = self._quick, None
        if quick is not None:
            quick.close()
        if client is not None:
            # Best effort: the sockets go away with the object anyway.
            with contextlib.suppress(*_CLIENT_ERRORS):
                client.close()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, spec: ContainerSpec) -> str:
        api = self.api
        container_id = self._create(spec, pull_if_missing=spec.auto_pull)
        if spec.may_start is not None and not spec.may_start():
            with contextlib.suppress(*_CLIENT_ERRORS):
                api.remove_container(container_id, force=True, v=True)
            raise StartFailed(
                f"Container {spec.name} not started: the launch lost its claim",
                spec.name,
                container_id,
            )
        try:
            # By id: a launcher that was too slow and lost this attempt holds the id of a
            # container that may have been replaced since, so its late start fails instead
            # of running the new owner's container.
            api.start(container_id)
        except docker.errors.NotFound as exc:
            raise StartFailed(
                f"Container {spec.name} was removed before it could start: {exc}",
                spec.name,
                container_id,
                gone=True,
                original=exc,
            ) from exc
        except _CLIENT_ERRORS as exc:
            raise StartFailed(
                f"Docker could not start container {spec.name}: {exc}",
                spec.name,
                container_id,
                original=exc,
            ) from exc
        self._started.add(spec.name)
        return container_id

    def remove_unstarted(self, name: str) -> bool:
        # Not forced: the daemon refuses once the container started, and then it is the
        # attempt's container, to adopt.
        try:
            data = self.api.inspect_container(name)
            if (data.get("State") or {}).get("Status") != "created":
                return False
            self.api.remove_container(name, force=False, v=True)
        except docker.errors.NotFound:
            return True
        except _CLIENT_ERRORS:
            return False
        return True

    def _create(self, spec: ContainerSpec, pull_if_missing: bool) -> str:
        api = self.api
        binds = {
            host_path: {"bind": target, "mode": "ro" if read_only else "rw"}
            for host_path, target, read_only in spec.bind_mounts
        }
        host_options: dict[str, Any] = {"privileged": False, "binds": binds or None}
        if spec.memory_mb is not None:
            host_options["mem_limit"] = f"{spec.memory_mb}m"
            # Memory plus swap, set to the same value: no swap at all. Left unset, Docker
            # allows as much swap again as the limit on a host that has swap, so a job
            # over its limit would page instead of being killed for memory, and the limit
            # that is recorded (and raised on an out-of-memory retry) would not be the one
            # that held.
            host_options["memswap_limit"] = f"{spec.memory_mb}m"
        if spec.cpus is not None:
            host_options["nano_cpus"] = round(spec.cpus * 1e9)
        if spec.network_mode:
            host_options["network_mode"] = spec.network_mode
        try:
            host_config = api.create_host_config(**host_options)
            created = api.create_container(
                spec.image,
                command=spec.command,
                name=spec.name,
                labels=dict(spec.labels),
                environment=dict(spec.environment),
                working_dir=spec.working_dir or None,
                host_config=host_config,
            )
        except docker.errors.ImageNotFound as exc:
            if not pull_if_missing:
                raise ExecutorError(
                    f"Image {spec.image} not found on {self.base_url}: {exc}", original=exc
                ) from exc
            self._pull(spec.image)
            return self._create(spec, pull_if_missing=False)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                container_id, status = self._existing(spec.name)
                raise ContainerExists(
                    spec.name, container_id, unstarted=status == "created"
                ) from exc
            raise ExecutorError(
                f"Docker could not create container {spec.name}: {exc}", original=exc
            ) from exc
        except _CLIENT_ERRORS as exc:
            raise ExecutorError(
                f"Docker could not create container {spec.name}: {exc}", original=exc
            ) from exc
        return str(created["Id"])

    def _pull(self, image: str) -> None:
        # The high-level pull reads the whole progress stream and then looks the image up,
        # so an error reported inside the stream still raises.
        with self._translate(f"pull of {image}"):
            self.client.images.pull(image)

    def _existing(self, name: str) -> tuple[str, str]:
        """(id, status) of the container holding ``name``; ("", "") if it went away."""
        try:
            data = self.api.inspect_container(name)
        except _CLIENT_ERRORS:
            return "", ""  # removed in between: the conflict still stands for the caller
        return str(data.get("Id", "")), str((data.get("State") or {}).get("Status") or "")

    def inspect(self, name: str) -> ContainerState | None:
        with self._translate(f"inspect of {name}"):
            try:
                data = self.api.inspect_container(name)
            except docker.errors.NotFound:
                return None
        state = data.get("State") or {}
        if state.get("Status") == "removing":
            # Being removed (``docker rm -f`` kills first, then removes): gone for the job.
            return None
        running = bool(state.get("Running"))
        error = str(state.get("Error") or "")
        exit_code: int | None = None
        if state.get("Status") == "created":
            # Docker reports exit code 0 for a container that never ran; that must not
            # read as success.
            error = error or "container was created but never started"
        elif not running:
            exit_code = int(state.get("ExitCode") or 0)
        return ContainerState(
            container_id=str(data.get("Id", "")),
            running=running,
            exit_code=exit_code,
            started_at=parse_docker_time(state.get("StartedAt")),
            finished_at=parse_docker_time(state.get("FinishedAt")),
            error=error,
            # Set by the daemon from the kernel's OOM notification for the container's
            # cgroup (under cgroup v1, and v2 on daemons that read memory.events); the
            # watcher also remembers the ``oom`` events it saw, for daemons that miss it.
            oom_killed=not running and bool(state.get("OOMKilled")),
        )

    def wait(self, name: str, timeout: float) -> int | None:
        if timeout <= 0:
            # requests refuses a zero timeout; a non-blocking wait is a look.
            state = self.inspect(name)
            if state is None:
                raise ExecutorError(f"Container {name} does not exist")
            return self._checked_exit_code(name, state)
        api = self.api
        try:
            result = api.wait(name, timeout=timeout)
        except docker.errors.NotFound as exc:
            raise ExecutorError(f"Container {name} does not exist", original=exc) from exc
        except _CLIENT_ERRORS as exc:
            if _is_read_timeout(exc):
                return None
            raise ExecutorError(f"Docker wait for {name} failed: {exc}", original=exc) from exc
        code = int(result.get("StatusCode", -1))
        if name in self._started:
            self._started.discard(name)  # it has ended: forget it
            return code
        if code != 0:
            return code
        # The daemon answers 0 at once for a container that was created but never started;
        # only a look at its state tells that apart from a real success (needed for one
        # this executor did not start: adopted after a redelivery or a rescue).
        state = self.inspect(name)
        if state is None:
            return code
        return self._checked_exit_code(name, state)

    @staticmethod
    def _checked_exit_code(name: str, state: ContainerState) -> int | None:
        if state.running:
            return None
        if state.exit_code is None:
            raise ExecutorError(f"Container {name} has not run: {state.error}")
        return state.exit_code

    def logs(self, name: str, max_bytes: int) -> tuple[str, str]:
        try:
            # Each tail becomes text at once: its buffer is gone before the next stream.
            stdout = self._log_tail(name, True, max_bytes).text()
            stderr = self._log_tail(name, False, max_bytes).text()
        except _ContainerGone:
            return "", ""
        return stdout, stderr

    def _log_tail(self, name: str, stdout: bool, max_bytes: int) -> LogTail:
        # The daemon can only cut a log by entries, and counts those of both streams
        # together, so each stream is read alone, through to its end, into a tail buffer.
        # Without a TTY the SDK yields one frame per log entry (16 KiB at most), so memory
        # stays bounded whatever the container printed.
        tail = LogTail(max_bytes)
        with self._translate(f"logs of {name}"):
            try:
                stream = self.api.logs(
                    name, stdout=stdout, stderr=not stdout, stream=True, follow=False
                )
            except docker.errors.NotFound as exc:
                raise _ContainerGone from exc
            # The SDK's wrapper ends quietly when the connection breaks, which would store
            # a partial log as if complete; its inner generator raises instead. (If the SDK
            # renames it, reads fall back to the wrapper.)
            frames = getattr(stream, "_stream", stream)
            try:
                for frame in frames:
                    tail.feed(frame)
            finally:
                with contextlib.suppress(*_CLIENT_ERRORS, AttributeError):
                    stream.close()
        return tail

    def recent_logs(self, name: str, max_bytes: int, timeout: float) -> tuple[str, str]:
        # Through a client of its own whose connects and reads give up after ``timeout``:
        # the shared client waits self.timeout (a minute, for slow pulls), which would hold
        # a person's request that long on a daemon that stopped answering.
        quick = self._quick_executor(timeout)
        try:
            with quick._translate(f"logs of {name}"):
                stdout, stderr = quick._read_recent(name, max_bytes, time.monotonic() + timeout)
        except _ContainerGone:
            return "", ""
        # A tail not known to start at the log's start follows the marker of earlier output
        # not read: no count covers what came before the window.
        out = stdout.tail.text(earlier_unread=not stdout.whole)
        return out, stderr.tail.text(earlier_unread=not stderr.whole)

    def _quick_executor(self, timeout: float) -> DockerExecutor:
        with self._lock:
            quick = self._quick
            if quick is None or quick.timeout != timeout:
                stale, quick = quick, DockerExecutor(self.base_url, self.tls, timeout)
                quick._tls_factory = self._tls_factory
                self._quick = quick
                if stale is not None:
                    stale.close()
            return quick

    def _read_recent(
        self, name: str, max_bytes: int, deadline: float
    ) -> tuple[_StreamRead, _StreamRead]:
        """The tails of stdout and stderr from the recent end of the log, each holding
        ``max_bytes`` when the log has that much, within the read's byte budget and
        ``deadline``.

        Windows grow only while a stream lacks bytes and the log may hold more. A request
        for both streams shows whether the window held the whole log (fewer entries came
        than were asked for). Once one stream is full, the other is asked for alone, unless
        both fit in what is left of the budget: its answer then carries none of the full
        stream's bytes, but cannot tell whether the window held the whole log, so that
        stream keeps the marker of earlier output not read.
        """
        both = (_STDOUT, _STDERR)
        budget = max(
            _RECEIVE_BUDGET * max_bytes,
            _FIRST_WINDOW * (_ENTRY_MAX_BYTES + _FRAME_HEADER.size),
        )
        scan_limit = _SCAN_BUDGET * max(max_bytes, _ENTRY_MAX_BYTES)
        window = _FIRST_WINDOW
        try:
            first = self._read_window(name, both, window, max_bytes, deadline, budget)
        except _ReadCut as exc:
            raise ExecutorError(f"Docker logs of {name} {exc}") from exc
        best = first.reads
        spent = first.received
        # Bytes per entry of the log, both streams together, as the last answer for both
        # showed them.
        entry_bytes = first.received / max(1, first.frames)
        while True:
            wanted = [s for s in both if not best[s].whole and best[s].tail.seen < max_bytes]
            if not wanted:
                break
            last = window
            # The stream closest to full sets the pace: one with nothing in the window would
            # make it grow by the most, and the other's bytes with it. Once the first is
            # full, the other is asked for alone, at no cost in bytes for the full one.
            window = min(_next_window(last, best[s].tail.seen, max_bytes) for s in wanted)
            together = len(wanted) == len(both) or window * entry_bytes <= budget - spent
            if not together:
                # Never further back than the daemon may go through for one stream.
                window = min(window, int(scan_limit // (entry_bytes + _ENTRY_OVERHEAD)))
                if window <= last:
                    break
            asked = both if together else tuple(wanted)
            try:
                got = self._read_window(name, asked, window, max_bytes, deadline, budget - spent)
            except _ReadCut:
                break
            except _CLIENT_ERRORS as exc:
                # Each wait was given the time left: a timeout is the deadline passing, and
                # the last complete answer stands. Any other failure is the daemon's.
                if not (_is_read_timeout(exc) or isinstance(exc, requests.exceptions.Timeout)):
                    raise
                break
            spent += got.received
            best.update(got.reads)
            if together:
                entry_bytes = got.received / max(1, got.frames)
        return best[_STDOUT], best[_STDERR]

    def _read_window(
        self,
        name: str,
        streams: tuple[int, ...],
        window: int,
        max_bytes: int,
        deadline: float,
        budget: int,
    ) -> _Window:
        """The tails of ``streams`` from the log's last ``window`` entries.

        Raises :class:`_ReadCut` once the answer exceeds ``budget`` bytes or ``deadline``
        passes. The answer is read here rather than by the SDK's stream reader, which turns
        the socket's timeout off: a daemon that stalled in mid-answer would then hold the
        read for ever.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _ReadCut("took too long to read")
        api = self.api
        response = api.get(
            f"{api.base_url}/v{api.api_version}/containers/{quote(name, safe='')}/logs",
            params={
                "stdout": int(_STDOUT in streams),
                "stderr": int(_STDERR in streams),
                "tail": window,
            },
            stream=True,
            # Each connect and each socket read, so no single wait outlasts the deadline.
            timeout=remaining,
        )
        tails = {stream: LogTail(max_bytes) for stream in streams}
        frames = received = 0
        try:
            if response.status_code == 404:
                raise _ContainerGone
            if response.status_code >= 400:
                raise ExecutorError(
                    f"Docker logs of {name} failed: {response.status_code} {response.text[:300]}"
                )
            while True:
                header = response.raw.read(_FRAME_HEADER.size)
                if not header:
                    break
                stream, length = _FRAME_HEADER.unpack(header)
                received += len(header) + length
                if received > budget:
                    # Checked before the entry is read: no more than the budget is taken.
                    raise _ReadCut(f"exceed {budget} bytes in their last {window} entries")
                data = response.raw.read(length) if length else b""
                if len(data) < length:
                    raise ExecutorError(f"Docker logs of {name} ended in mid-entry")
                if stream in tails:
                    tails[stream].feed(data)
                frames += 1
                if time.monotonic() > deadline:
                    raise _ReadCut("took too long to read")
        except struct.error as exc:
            raise ExecutorError(f"Docker logs of {name} ended in mid-entry", original=exc) from exc
        finally:
            response.close()
        # Fewer entries than asked for: the window held the whole log. Only an answer for
        # both streams tells: the window counts the entries of both.
        whole = len(streams) > 1 and frames < window
        return _Window({s: _StreamRead(tail, whole) for s, tail in tails.items()}, frames, received)

    def stop(self, name: str, timeout: float = 5) -> None:
        with self._translate(f"stop of {name}"):
            try:
                # The API takes whole seconds; rounding up never kills earlier than asked.
                self.api.stop(name, timeout=max(0, math.ceil(timeout)))
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 304:  # 304: it was not running
                    raise

    def remove(self, name: str) -> None:
        self._started.discard(name)
        with self._translate(f"removal of {name}"):
            try:
                self.api.remove_container(name, force=True, v=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                explanation = str(exc.explanation or "")
                if exc.status_code == 409 and "already in progress" in explanation:
                    return
                raise

    def events(self, since: float | None = None) -> EventStream:
        filters = {"type": "container", "event": list(WATCHED_EVENTS), "label": [JOB_LABEL]}
        with self._translate("event stream"):
            # The SDK reads this stream without a timeout; close() ends it from outside.
            raw = self.api.events(since=int(since) if since else None, filters=filters, decode=True)
        return _DockerEventStream(raw)

    def list_job_containers(self, installation: str | None = None) -> list[ContainerInfo]:
        # Several label filters must all match: the daemon does the selection.
        wanted = [JOB_LABEL]
        if installation is not None:
            wanted.append(f"{INSTALLATION_LABEL}={installation}")
        with self._translate("container listing"):
            found = self.api.containers(all=True, filters={"label": wanted})
        result = []
        for entry in found:
            labels = entry.get("Labels") or {}
            names = entry.get("Names") or []
            try:
                attempt = int(labels.get(ATTEMPT_LABEL) or 0)
            except ValueError:
                attempt = 0
            result.append(
                ContainerInfo(
                    container_id=str(entry.get("Id", "")),
                    name=str(names[0]).lstrip("/") if names else "",
                    job_id=str(labels.get(JOB_LABEL, "")),
                    attempt=attempt,
                    running=entry.get("State") == "running",
                    installation=str(labels.get(INSTALLATION_LABEL, "")),
                )
            )
        return result


class _DockerEventStream:
    """The daemon's event stream as :class:`ContainerEvent` values.

    Iteration ends when the daemon closes the stream or another thread calls close().
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[ContainerEvent]:
        for entry in self._raw:
            event = _event_from(entry)
            if event is not None:
                yield event

    def close(self) -> None:
        with contextlib.suppress(*_CLIENT_ERRORS, AttributeError):
            self._raw.close()


def _event_from(entry: Any) -> ContainerEvent | None:
    if not isinstance(entry, dict):
        return None
    action = str(entry.get("Action") or entry.get("status") or "")
    actor = entry.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    job_id = str(attributes.get(JOB_LABEL) or "")
    if action not in WATCHED_EVENTS or not job_id:
        return None
    try:
        attempt = int(attributes.get(ATTEMPT_LABEL) or 0)
    except ValueError:
        attempt = 0
    exit_code: int | None = None
    with contextlib.suppress(TypeError, ValueError):
        exit_code = int(attributes["exitCode"]) if "exitCode" in attributes else None
    nanos = entry.get("timeNano")
    stamp = float(nanos) / 1e9 if nanos else float(entry.get("time") or 0)
    return ContainerEvent(
        action=action,
        name=str(attributes.get("name") or ""),
        job_id=job_id,
        attempt=attempt,
        time=stamp,
        exit_code=exit_code,
    )


def _never_tty(container: Any) -> bool:
    return False


class _ContainerGone(Exception):
    """Internal: the container disappeared between two calls."""


class _ReadCut(Exception):
    """Internal: a log read stopped at its deadline or byte budget."""


class _StreamRead(NamedTuple):
    """One stream's tail from one answer, and whether the answer held the whole log."""

    tail: LogTail
    whole: bool


class _Window(NamedTuple):
    """One answer of the daemon: the tails of the streams asked for, how many entries came
    (of any stream) and how many bytes were received."""

    reads: dict[int, _StreamRead]
    frames: int
    received: int


def _next_window(window: int, seen: int, max_bytes: int) -> int:
    """The window after one whose answer held ``seen`` bytes of a stream.

    Enough entries for ``max_bytes`` of that stream at the bytes per entry it had, and a
    quarter more for lines of uneven length; at least twice the last window, so that a few
    requests reach any size, and at most :data:`_MAX_GROWTH` times it, because older output
    may be far longer per entry than the recent end.
    """
    if seen <= 0:
        return window * _MAX_GROWTH
    needed = -(-window * max_bytes * 5 // (seen * 4))  # rounded up
    return min(window * _MAX_GROWTH, max(window * 2, needed))
