"""Shared plumbing of the dispatch and throughput benchmarks.

Each benchmark gets its own PostgreSQL database (created and migrated here) and runs
against a Redis database number that the test suite does not use (7, flushed at start), so
it never touches what the test suite uses. The two benchmarks share that Redis database:
run them one at a time (they would skew each other's timings anyway). Worker processes
are started with the test suite's ``Proc`` (own process group, log under
``test-output/celery/``) and stopped by process group at the end.

Environment (all optional):
  BENCH_PG_URL      server and credentials (default postgres://dcc:dcc@127.0.0.1:5432/dcc);
                    its database name is replaced by each benchmark's own
  BENCH_BROKER_URL  broker and result backend (default redis://127.0.0.1:6379/7)
  DCC_TEST_IMAGE    image to run (default dcc-test-busybox:latest)
  DOCKER_HOST       Docker daemon (default unix:///var/run/docker.sock)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = "postgres://dcc:dcc@127.0.0.1:5432/dcc"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
JOB_LABEL = "dcc.job_id"


def emit(name: str, value: Any) -> None:
    """Print one ``name=value`` line (floats with one decimal)."""
    if isinstance(value, float):
        value = f"{value:.1f}" if math.isfinite(value) else "nan"
    print(f"{name}={value}", flush=True)


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Samples:
    """Named lists of durations in seconds, printed as p50/p95 in milliseconds."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, seconds: float | None) -> None:
        if seconds is not None:
            self.values[name].append(seconds)

    def p(self, name: str, pct: float) -> float:
        return percentile(self.values.get(name, []), pct) * 1000

    def emit(self, names: Iterable[str]) -> None:
        for name in names:
            emit(f"{name}_p50_ms", self.p(name, 50))
            emit(f"{name}_p95_ms", self.p(name, 95))


# -- database, broker, Django ----------------------------------------------------------------


def database_url(server_url: str, name: str) -> str:
    return urlunparse(urlparse(server_url)._replace(path=f"/{name}"))


def ensure_database(server_url: str, name: str) -> None:
    """Create the benchmark's database on the server when it does not exist yet."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if found is None:
            # DuplicateDatabase: created by a concurrent run in between.
            with contextlib.suppress(errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@dataclasses.dataclass
class BenchEnv:
    """Where one benchmark run lives, and the environment its workers get."""

    database_url: str
    broker_url: str
    image: str
    overrides: dict[str, Any]
    app: Any

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("DCC_TEST_DATABASE", None)
        paths = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            DATABASE_URL=self.database_url,
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.broker_url,
            DCC_SETTINGS_JSON=json.dumps(self.overrides),
            PYTHONPATH=os.pathsep.join(paths),
        )
        return env


def prepare(database: str, overrides: dict[str, Any]) -> BenchEnv:
    """Create and migrate the benchmark database, set up Django in this process (with the
    same settings the workers get), flush the broker database and return the Celery app."""
    server = os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL)
    broker = os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER_URL)
    url = database_url(server, database)
    ensure_database(server, database)
    os.environ.pop("DCC_TEST_DATABASE", None)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=url,
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=broker,
        DCC_SETTINGS_JSON=json.dumps(overrides),
    )
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    import django
    import redis
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    redis.Redis.from_url(broker).flushdb()

    from django.conf import settings

    from tests.celery_app import app

    return BenchEnv(url, broker, str(settings.TEST_IMAGE), overrides, app)


def reset_jobs(client: Any, bench_label: str) -> None:
    """Remove containers left by an earlier interrupted run, then every job row."""
    from django_container_celery.models import ContainerJob

    remove_containers(client, {str(pk) for pk in ContainerJob.objects.values_list("pk", flat=True)})
    remove_containers(client, set(), bench_label)
    ContainerJob.objects.all().delete()


def bench_containers(client: Any, job_ids: set[str], bench_label: str | None = None) -> list[str]:
    """Ids of containers (any state) of these jobs, plus those carrying ``bench_label``.

    Uses the listing alone (no inspect per container): containers of other runs on the same
    daemon come and go meanwhile.
    """
    found = []
    if job_ids:
        for entry in client.api.containers(all=True, filters={"label": JOB_LABEL}):
            if (entry.get("Labels") or {}).get(JOB_LABEL) in job_ids:
                found.append(str(entry["Id"]))
    if bench_label:
        found += [
            str(entry["Id"])
            for entry in client.api.containers(all=True, filters={"label": bench_label})
        ]
    return found


def remove_containers(client: Any, job_ids: set[str], bench_label: str | None = None) -> int:
    import docker.errors

    removed = 0
    for container_id in bench_containers(client, job_ids, bench_label):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(container_id, force=True)
            removed += 1
    return removed


# -- worker -----------------------------------------------------------------------------------


def start_worker(env: BenchEnv, name: str, concurrency: int, timeout: float = 60) -> Any:
    """A prefork ``celery worker`` of the test app that also serves the baseline task."""
    from tests.celery_support import Proc

    node = f"{name}-{os.getpid()}@{socket.gethostname()}"
    argv = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker"]
    argv += ["-l", "info", "-c", str(concurrency), "-n", node, "-P", "prefork"]
    argv += ["--without-gossip", "--without-mingle", "--include", "bench.plain_tasks"]
    proc = Proc(name, argv, env.worker_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"worker exited at start:\n{proc.log_tail()}")
        if env.app.control.ping(destination=[node], timeout=0.5):
            return proc
    proc.stop()
    raise RuntimeError(f"worker did not answer a ping within {timeout}s:\n{proc.log_tail()}")


@contextlib.contextmanager
def worker_and_events(env: BenchEnv, name: str, concurrency: int) -> Iterator[tuple[Any, Any]]:
    """A benchmark worker and a Docker event collector started before it; on a failure the
    worker's log tail is printed, and both are stopped on every way out."""
    from django.conf import settings

    events = DockerEvents(settings.DOCKER_HOST, ("dcc-", "dccbench-"))
    worker = start_worker(env, name, concurrency)
    try:
        yield worker, events
    except BaseException:
        print(worker.log_tail(), file=sys.stderr)
        raise
    finally:
        worker.stop()
        events.close()


READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def results_state(app: Any, task_ids: Sequence[str]) -> Counter[str]:
    """How many of these tasks' results are stored, by Celery state, in one round trip."""
    backend = app.backend
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    states: Counter[str] = Counter()
    for raw in backend.client.mget(keys):
        if raw is None:
            states["PENDING"] += 1
        else:
            states[str(json.loads(raw).get("status"))] += 1
    return states


def results_ready(app: Any, task_ids: Sequence[str]) -> int:
    """How many of these tasks have a final result stored."""
    states = results_state(app, task_ids)
    return sum(states[state] for state in READY_STATES)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- Docker events ----------------------------------------------------------------------------


class DockerEvents:
    """Collects container events (create, start, die, destroy) with the daemon's clock.

    The daemon stamps each event when it happens, in the same wall clock as ``time.time()``
    on this host, so the events time every path (app, plain task, direct call) alike.
    Only containers whose names start with one of ``prefixes`` are kept.
    """

    ACTIONS = ("create", "start", "die", "destroy")

    def __init__(self, base_url: str, prefixes: tuple[str, ...]) -> None:
        import docker

        self.prefixes = prefixes
        self.first: dict[str, dict[str, float]] = defaultdict(dict)
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._client = docker.DockerClient(base_url=base_url)
        # Subscribed once the call returns: no later event is missed.
        self._stream = self._client.events(decode=True, filters={"type": "container"})
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                action = str(event.get("Action") or event.get("status") or "")
                if action not in self.ACTIONS:
                    continue
                name = str(((event.get("Actor") or {}).get("Attributes") or {}).get("name", ""))
                if not name.startswith(self.prefixes):
                    continue
                stamp = int(event.get("timeNano") or 0) / 1e9 or float(event.get("time", 0))
                with self._lock:
                    self.first[name].setdefault(action, stamp)
                    self.counts[(name, action)] += 1
        except Exception:  # the stream was closed under us: the run is over
            return

    def at(self, name: str, action: str) -> float | None:
        with self._lock:
            return self.first.get(name, {}).get(action)

    def count(self, action: str, prefixes: tuple[str, ...]) -> int:
        """How many ``action`` events containers named with one of ``prefixes`` had."""
        with self._lock:
            return sum(
                count
                for (name, seen), count in self.counts.items()
                if seen == action and name.startswith(prefixes)
            )

    def max_running(self, names: Iterable[str]) -> int:
        """Most containers among ``names`` running at one moment (start to die)."""
        marks: list[tuple[float, int]] = []
        with self._lock:
            for name in names:
                times = self.first.get(name, {})
                if "start" in times and "die" in times:
                    marks += [(times["start"], 1), (times["die"], -1)]
        running = peak = 0
        for _, step in sorted(marks):
            running += step
            peak = max(peak, running)
        return peak

    def close(self) -> None:
        # Closing a half-read socket may complain; it is closed anyway.
        with contextlib.suppress(Exception):
            self._stream.close()
        self._thread.join(timeout=2)
        self._client.close()


def stage_samples(
    samples: Samples,
    path: str,
    events: DockerEvents,
    name: str,
    began: float,
    done: float,
) -> None:
    """Split one run (``began`` → ``done``) at its container's events into stages."""
    marks = [events.at(name, action) for action in DockerEvents.ACTIONS]
    if any(mark is None for mark in marks):
        return
    create, start, die, destroy = (float(mark) for mark in marks if mark is not None)
    samples.add(f"{path}_stage_to_create", create - began)
    samples.add(f"{path}_stage_create_to_start", start - create)
    samples.add(f"{path}_stage_start_to_die", die - start)
    samples.add(f"{path}_stage_die_to_destroy", destroy - die)
    samples.add(f"{path}_stage_destroy_to_done", done - destroy)
    samples.add(f"{path}_running_docker", start - began)
