"""Every setting of the app, read from the ``CONTAINER_CELERY`` dict in Django settings.

Read a value as ``app_settings.LEASE_SECONDS``; it is looked up each time, so tests can use
``override_settings(CONTAINER_CELERY={...})``. Unknown keys raise ``ImproperlyConfigured``
so a typo does not silently fall back to a default.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, Any] = {
    # A claim is owned for this long. A launching job's lease belongs to its launcher; a
    # running job's lease is renewed by the watcher leading its host at every reconcile
    # pass. After it expires (by the database's clock) the job may be taken over.
    "LEASE_SECONDS": 60,
    # A launch (image pull, create, start) keeps its lease alive for at most this many
    # seconds. After that its launcher stops renewing: the lease expires, a watcher takes
    # the launch over and continues the same attempt (same container name).
    "LAUNCH_TIMEOUT": 900,
    # A job whose finishing fails this many times in a row (the database refuses the row,
    # or another unexpected error repeats) ends failed with the reason instead of staying
    # running. A daemon that does not answer does not count: its jobs wait for it.
    "FINISH_TRIES": 5,
    # A job whose attempts end this many times without an outcome (its container vanished,
    # its host was lost during the launch, its finishing kept failing) is failed and marked
    # as needing attention instead of being retried again, whatever its max_retries.
    "MAX_ATTEMPTS_WITHOUT_OUTCOME": 3,
    # A host whose daemon fails this many calls in a row (launches, reconcile listings)
    # is marked unhealthy: no job starts there until a call succeeds again (the leading
    # watcher's reconcile pass probes it every RECONCILE_INTERVAL).
    "HOST_FAILURES_BEFORE_UNHEALTHY": 3,
    # Seconds between beat's runs of dispatch_ready_jobs (and rescue_stale_jobs).
    "DISPATCH_INTERVAL": 5,
    # A due, unclaimed, queued job whose last Celery message is older than this is sent
    # again: its message is presumed lost (broker down, worker died before claiming).
    "REDISPATCH_SECONDS": 60,
    # Global limit on jobs launching or running, used by dispatch and the queue command
    # when they are not given one.
    "MAX_CONCURRENT_JOBS": 10,
    # Each of stdout and stderr is stored truncated to its last LOG_MAX_BYTES bytes.
    "LOG_MAX_BYTES": 64 * 1024,
    # Host paths that jobs may bind-mount (prefix match on resolved paths). Empty: none.
    "ALLOWED_BIND_MOUNTS": [],
    # Celery queue for the app's tasks. None: Celery's default queue.
    "TASK_QUEUE": None,
    # Route run_container_job to "<TASK_QUEUE or 'dcc'>.<host name>" for each job's host.
    "PER_HOST_QUEUES": False,
    # Extra or replacement named retry strategies: {name: {max_attempts, base_delay, ...}}.
    "RETRY_STRATEGIES": {},
    # Strategy used when a job's retry_strategy is blank.
    "DEFAULT_RETRY_STRATEGY": "default",
    # Extra regular expressions (case-insensitive) added to the built-in classifiers.
    "TRANSIENT_PATTERNS": [],
    "PERMANENT_PATTERNS": [],
    # What a job without a memory_limit / cpu_limit counts for on a host that declares a
    # memory or CPU capacity (ExecutorHost.memory_capacity_mb, cpu_capacity).
    "DEFAULT_JOB_MEMORY_MB": 256,
    "DEFAULT_JOB_CPUS": 1.0,
    # Kept back for the daemon and the host's own processes when a host's capacity is read
    # from its daemon (docker info: MemTotal, NCPU).
    "HOST_MEMORY_RESERVE_MB": 512,
    "HOST_CPU_RESERVE": 0.5,
    # Upper bounds checked by validation.
    "MAX_MEMORY_MB": 64 * 1024,
    "MAX_CPUS": 64.0,
    "MAX_TIMEOUT_SECONDS": 7 * 24 * 3600,
    # Seconds between looks at the row by a canvas step (.s()/.si()) waiting for its job.
    "POLL_INTERVAL": 1.0,
    # Run a watcher thread in every Celery worker's main process (and in the queue
    # command). False: nothing follows Docker events, and beat's rescue_stale_jobs runs the
    # reconcile pass instead (jobs then finish up to its interval late).
    "WATCHER": True,
    # Seconds between the leading watcher's reconcile passes over a host: they catch exits
    # that events missed, timeouts, vanished containers and expired launches. Keep it well
    # under LEASE_SECONDS: each pass renews the leases of the host's running jobs.
    "RECONCILE_INTERVAL": 5.0,
    # Send Celery task events (task-succeeded, task-failed, task-retried) when a job ends,
    # so that Flower shows the outcome whichever process finished the job.
    "SEND_TASK_EVENTS": True,
    # Keep exited containers instead of removing them after harvest (for debugging).
    "KEEP_CONTAINERS": False,
    # Docker network mode for job containers; None leaves Docker's default.
    "NETWORK_MODE": None,
    # Finished jobs older than this many days are removed by cleanup_old_jobs.
    "CLEANUP_AFTER_DAYS": 30,
    # Executor used when a job has no host: "docker" or a dotted path to a class.
    "EXECUTOR": "docker",
    # Docker connection used when no ExecutorHost row exists.
    "DEFAULT_DOCKER_HOST": "unix:///var/run/docker.sock",
    # Seconds the queue command waits for running jobs after SIGTERM/SIGINT.
    "SHUTDOWN_TIMEOUT": 30,
}


class AppSettings:
    """Attribute access to ``CONTAINER_CELERY`` merged over :data:`DEFAULTS`."""

    def user_settings(self) -> dict[str, Any]:
        value = getattr(settings, "CONTAINER_CELERY", None) or {}
        if not isinstance(value, dict):
            raise ImproperlyConfigured("CONTAINER_CELERY must be a dict.")
        unknown = sorted(set(value) - set(DEFAULTS))
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown CONTAINER_CELERY setting(s): {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(DEFAULTS))}."
            )
        return value

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return self.user_settings().get(name, DEFAULTS[name])


app_settings = AppSettings()
