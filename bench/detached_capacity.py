"""Detached capacity: containers one worker of concurrency 2 keeps running at once.

Usage, from the repository root, with PostgreSQL, Redis and Docker up::

    python -m bench.detached_capacity [--jobs 100] [--baseline-jobs 6]

Two runs against one prefork worker of concurrency 2:

* ``blocking`` (the baseline): the plain Celery task of ``bench/plain_tasks.py``, which
  starts a container and waits for it in its worker slot, as version 1's run task did.
  ``--baseline-jobs`` tasks of ``sleep 5`` are sent at once; ``blocking_max_running`` is the
  most containers running at one moment (by Docker's start/die events).
* ``detached``: ``--jobs`` container jobs queued with ``job.delay()``. Each container waits
  for its own file in a bind-mounted folder, so all of them run until every one has
  started; ``detached_max_running`` is the most running at once (Docker's events again).
  Then the files are created one every 50 ms: each container exits on its own, and
  ``exit_to_final_p50_ms`` / ``_p95_ms`` are the time from the daemon's ``die`` event to
  the job's ``completed_at`` (both stamped by this host's clock), recorded by the
  watcher's event path. ``worker_rss_mb`` is the resident memory of the worker (main
  process and pool children) while all containers run.

The goal is ``detached_max_running`` equal to ``--jobs`` (100) against 2 for the blocking
task. Runs against the database ``dcc_bench_detached`` and the Redis database of
``BENCH_BROKER_URL`` (see ``bench/common.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

DATABASE = "dcc_bench_detached"
RELEASE_EVERY = 0.05


def group_rss_mb(pid: int) -> float:
    """Resident memory of a process group (the worker and its pool children)."""
    out = subprocess.run(
        ["ps", "-o", "rss=", "-g", str(os.getpgid(pid))], capture_output=True, text=True
    ).stdout
    return sum(int(value) for value in out.split()) / 1024


def run_blocking(env: common.BenchEnv, events: common.DockerEvents, count: int) -> int:
    from bench.plain_tasks import BENCH_LABEL, plain_run_container

    tag = uuid.uuid4().hex[:8]
    names = [f"dccbench-{tag}-blocking-{n}" for n in range(count)]
    results = [
        plain_run_container.delay(env.image, ["sleep", "5"], name, {BENCH_LABEL: "1"})
        for name in names
    ]
    for result in results:
        result.get(timeout=120)
    time.sleep(0.5)
    return events.max_running(names)


def run_detached(
    env: common.BenchEnv, events: common.DockerEvents, worker: object, count: int, folder: str
) -> dict[str, float]:
    from django_container_celery.models import ContainerJob

    jobs = [
        ContainerJob.objects.create_job(
            name="bench-detached",
            docker_image=env.image,
            command=f"sh -c 'while [ ! -e /signal/go-{n} ]; do sleep 1; done'",
            bind_mounts=[f"{folder}:/signal:ro"],
            timeout_seconds=600,
            max_retries=0,
        )
        for n in range(count)
    ]
    began = time.monotonic()
    for job in jobs:
        job.delay()
    ids = [job.pk for job in jobs]
    if not common.wait_until(
        lambda: ContainerJob.objects.filter(pk__in=ids, status="running").count() == count, 150
    ):
        raise RuntimeError("not every job reached running")
    all_running_s = time.monotonic() - began
    rss = group_rss_mb(worker.pid)  # type: ignore[attr-defined]
    for n in range(count):
        Path(folder, f"go-{n}").touch()
        time.sleep(RELEASE_EVERY)
    if not common.wait_until(
        lambda: ContainerJob.objects.filter(pk__in=ids, status="completed").count() == count, 60
    ):
        raise RuntimeError("not every job completed")
    time.sleep(0.5)
    samples = common.Samples()
    for job in ContainerJob.objects.filter(pk__in=ids):
        died = events.at(job.container_name, "die")
        if died is not None and job.completed_at is not None:
            samples.add("exit_to_final", job.completed_at.timestamp() - died)
    names = [f"dcc-{pk}-a1" for pk in ids]
    return {
        "max_running": float(events.max_running(names)),
        "all_running_s": all_running_s,
        "rss": rss,
        "p50": samples.p("exit_to_final", 50),  # milliseconds
        "p95": samples.p("exit_to_final", 95),
        "measured": float(len(samples.values.get("exit_to_final", []))),
        "containers_per_job": events.count("create", ("dcc-",)) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--baseline-jobs", type=int, default=6)
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="dcc-bench-signal-")
    os.chmod(folder, 0o755)
    overrides = {
        "MAX_CONCURRENT_JOBS": args.jobs + 10,
        "ALLOWED_BIND_MOUNTS": [folder],
        "RECONCILE_INTERVAL": 5.0,
    }
    wall = time.monotonic()
    env = common.prepare(DATABASE, overrides)

    from bench.plain_tasks import BENCH_LABEL, docker_client
    from django_container_celery.models import ContainerJob

    client = docker_client()
    common.reset_jobs(client, BENCH_LABEL)
    try:
        with common.worker_and_events(env, "bench-detached", concurrency=2) as (worker, events):
            blocking = run_blocking(env, events, args.baseline_jobs)
            detached = run_detached(env, events, worker, args.jobs, folder)
    finally:
        ids = {str(pk) for pk in ContainerJob.objects.values_list("pk", flat=True)}
        left = len(common.bench_containers(client, ids, BENCH_LABEL))
        common.remove_containers(client, ids, BENCH_LABEL)
        shutil.rmtree(folder, ignore_errors=True)

    common.emit("worker_concurrency", 2)
    common.emit("blocking_jobs", args.baseline_jobs)
    common.emit("blocking_max_running", blocking)
    common.emit("detached_jobs", args.jobs)
    common.emit("detached_max_running", int(detached["max_running"]))
    common.emit("detached_all_running_after_s", detached["all_running_s"])
    common.emit("capacity_ratio", detached["max_running"] / max(1, blocking))
    common.emit("worker_rss_mb", detached["rss"])
    common.emit("exit_to_final_measured", int(detached["measured"]))
    common.emit("exit_to_final_p50_ms", detached["p50"])
    common.emit("exit_to_final_p95_ms", detached["p95"])
    common.emit("containers_per_job", f"{detached['containers_per_job']:.2f}")
    common.emit("containers_left", left)
    common.emit("goal_met", "yes" if detached["max_running"] >= args.jobs else "no")
    common.emit("wall_s", time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
