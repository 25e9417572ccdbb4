"""A host's memory and CPU capacity, read from its daemon, and its use shown as text.

Reading is separate from writing so that callers may ask several daemons at once from
threads and then write from their own database connection.
"""

from __future__ import annotations

from django.core.validators import MinValueValidator
from django.utils import timezone

from .conf import app_settings
from .exceptions import ExecutorError
from .executors import Executor, executor_for
from .models import ExecutorHost
from .placement import HostRoom

__all__ = ["apply_capacity", "cpu_use", "memory_use", "read_capacity", "write_capacity"]


def _minimum(field: str) -> float:
    """The smallest value the model accepts, so a tiny machine still gets a valid row."""
    validators = getattr(ExecutorHost._meta.get_field(field), "validators", ())
    for validator in validators:
        if isinstance(validator, MinValueValidator):
            return float(validator.limit_value)
    return 0.0


def read_capacity(host: ExecutorHost, executor: Executor | None = None) -> tuple[int, float]:
    """(memory MiB, CPU cores) that the host's jobs may use: what its daemon reports,
    less ``HOST_MEMORY_RESERVE_MB`` and ``HOST_CPU_RESERVE`` for the daemon and the
    machine's own processes. Raises ExecutorError when the daemon cannot tell."""
    info = (executor or executor_for(host)).info()
    memory = info.memory_mb - int(app_settings.HOST_MEMORY_RESERVE_MB)
    # Rounded so that 0.1-step reserves do not leave 3.3999999999999995 in the row.
    cpus = round(info.cpus - float(app_settings.HOST_CPU_RESERVE), 3)
    # Smaller than what a job without limits counts for, the host could hold no such job,
    # and dispatch would fail every one of them as too big: refuse instead.
    least_memory = max(_minimum("memory_capacity_mb"), app_settings.DEFAULT_JOB_MEMORY_MB)
    least_cpus = max(_minimum("cpu_capacity"), float(app_settings.DEFAULT_JOB_CPUS))
    if memory < least_memory or cpus < least_cpus:
        raise ExecutorError(
            f"{host.name}: the daemon reports {info.memory_mb} MiB and {info.cpus:g} CPUs; "
            f"less the reserve (HOST_MEMORY_RESERVE_MB {app_settings.HOST_MEMORY_RESERVE_MB}, "
            f"HOST_CPU_RESERVE {app_settings.HOST_CPU_RESERVE}) that leaves {memory} MiB and "
            f"{cpus:g} CPUs, less than one job without limits counts for "
            f"(DEFAULT_JOB_MEMORY_MB {app_settings.DEFAULT_JOB_MEMORY_MB}, DEFAULT_JOB_CPUS "
            f"{app_settings.DEFAULT_JOB_CPUS}); set the capacity by hand or lower those settings"
        )
    return memory, cpus


def write_capacity(host: ExecutorHost, memory_mb: int, cpus: float) -> None:
    """Store both capacities in one UPDATE that touches no other column, so a concurrent
    edit of the host's other fields is not overwritten."""
    ExecutorHost.objects.filter(pk=host.pk).update(
        memory_capacity_mb=memory_mb, cpu_capacity=cpus, updated_at=timezone.now()
    )
    host.memory_capacity_mb, host.cpu_capacity = memory_mb, cpus


def apply_capacity(host: ExecutorHost, executor: Executor | None = None) -> tuple[int, float]:
    """Read the host's capacity from its daemon (see :func:`read_capacity`), store it on
    the row and return it."""
    memory, cpus = read_capacity(host, executor)
    write_capacity(host, memory, cpus)
    return memory, cpus


def memory_use(room: HostRoom) -> str:
    """``900 / 1024 MiB``, or ``900 MiB (not counted)`` when the host declares no memory."""
    if room.memory_mb is None:
        return f"{room.used_memory_mb} MiB (not counted)"
    return f"{room.used_memory_mb} / {room.memory_mb} MiB"


def cpu_use(room: HostRoom) -> str:
    """``1.5 / 4 cores``, or ``1.5 cores (not counted)`` when the host declares no CPUs."""
    if room.cpus is None:
        return f"{room.used_cpus:g} cores (not counted)"
    return f"{room.used_cpus:g} / {room.cpus:g} cores"
