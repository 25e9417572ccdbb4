"""Container runtimes, and the choice of one for a host.

``executor_for(host)`` is how the engine gets an executor: it reads the ``EXECUTOR``
setting and reuses one executor (so one Docker client and its connection pool) per host
per process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..conf import app_settings
from .base import (
    ContainerExists,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    DaemonInfo,
    Executor,
    StartFailed,
)
from .memory import FakeRun, MemoryExecutor

if TYPE_CHECKING:
    from ..models import ExecutorHost

__all__ = [
    "ContainerExists",
    "ContainerInfo",
    "ContainerSpec",
    "ContainerState",
    "DaemonInfo",
    "Executor",
    "FakeRun",
    "MemoryExecutor",
    "StartFailed",
    "clear_executor_cache",
    "executor_for",
    "memory_executor",
    "reset_memory_executor",
]

_lock = threading.Lock()
_memory: MemoryExecutor | None = None
# (process id, EXECUTOR setting, host identity) -> executor. The process id is part of the
# key because a Celery prefork child inherits this dict, and a client's sockets must never
# be shared between two processes.
_cache: dict[tuple[Hashable, ...], Executor] = {}


def memory_executor() -> MemoryExecutor:
    """The process-wide fake used when ``EXECUTOR`` is ``"memory"``; tests program it."""
    global _memory
    with _lock:
        if _memory is None:
            _memory = MemoryExecutor()
        return _memory


def reset_memory_executor() -> MemoryExecutor:
    """Replace the process-wide fake with a fresh one and return it."""
    global _memory
    with _lock:
        _memory = MemoryExecutor()
        return _memory


def clear_executor_cache() -> None:
    """Close and forget this process's cached executors (after a host edit, in tests)."""
    with _lock:
        mine = [key for key in _cache if key[0] == os.getpid()]
        executors = [_cache.pop(key) for key in mine]
        _cache.clear()  # entries of other processes are a parent's: dropped, never closed
    for executor in executors:
        executor.close()


def _host_key(host: ExecutorHost | None) -> tuple[Hashable, ...]:
    if host is None:
        return ("default", app_settings.DEFAULT_DOCKER_HOST)
    # Connection fields are part of the key so that an edited host gets a new client.
    return (
        host.pk,
        host.connection_string,
        host.tls_enabled,
        host.tls_verify,
        host.tls_ca_cert,
        host.tls_client_cert,
        host.tls_client_key,
    )


def _build(setting: str, host: ExecutorHost | None) -> Executor:
    if setting == "docker":
        from .docker import DockerExecutor

        if host is None:
            return DockerExecutor(app_settings.DEFAULT_DOCKER_HOST)
        return DockerExecutor.for_host(host)
    try:
        cls = import_string(setting)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"CONTAINER_CELERY['EXECUTOR'] is {setting!r}: not 'docker', 'memory' or an "
            f"importable class ({exc})."
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ImproperlyConfigured(
            f"CONTAINER_CELERY['EXECUTOR'] is {setting!r}, which is not an Executor subclass."
        )
    for_host = getattr(cls, "for_host", None)
    executor = for_host(host) if host is not None and callable(for_host) else cls()
    if not isinstance(executor, Executor):
        raise ImproperlyConfigured(f"{setting}.for_host() did not return an Executor.")
    return executor


def executor_for(host: ExecutorHost | None) -> Executor:
    """The executor for ``host`` (None: the default Docker host), shared within a process.

    Building one never connects, so this does not fail for a daemon that is down; the
    executor's methods raise :class:`~django_container_celery.exceptions.ExecutorError`.
    """
    setting = app_settings.EXECUTOR or "docker"
    if setting == "memory":
        return memory_executor()
    key = (os.getpid(), setting, *_host_key(host))
    with _lock:
        executor = _cache.get(key)
        if executor is None:
            pid = os.getpid()
            for stale in [k for k in _cache if k[0] != pid or k[1:3] == key[1:3]]:
                # Entries of another process were inherited across fork, and an entry for
                # the same host under other connection fields is outdated. Both are dropped
                # without close(): the parent still uses its connections, and another
                # thread here may be mid-call on the outdated one.
                del _cache[stale]
            executor = _build(setting, host)
            _cache[key] = executor
        return executor
