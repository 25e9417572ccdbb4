"""Dispatch overhead: ``job.delay()`` to container running and to result, one job at a time.

Usage, from the repository root, with PostgreSQL, Redis and Docker up::

    python -m bench.dispatch_overhead [--jobs 30] [--warmup 3] [--poll-interval 1.0]

Three paths run the same short container (``true`` in the test image, network "none"),
interleaved in rotating order so that load from anything else on the machine falls on all
of them alike:

* ``product``: a ContainerJob is created (not timed), then ``job.delay()``; the worker's
  ``run_container_job`` claims and launches it, and the worker's watcher finishes it from
  Docker's ``die`` event.
* ``plain``: the baseline, a plain Celery task (``bench/plain_tasks.py``) in the same worker
  that calls docker-py's ``containers.run(detach=True)``, ``wait()`` and ``remove()``.
* ``raw``: the same docker-py calls made directly from this process, without Celery: the
  floor.

Times start just before ``delay()`` (or the direct call). ``*_running`` ends when the
code that started the container recorded it as started: the row's ``started_at`` for the
product, the time the plain task noted right after ``containers.run`` returned, the same
moment for the raw path. ``*_completed`` ends when the caller holds the result
(``AsyncResult.get()`` returned, or the direct call did). ``*_running_docker`` and the
``*_stage_*`` figures come from the Docker daemon's own event stamps (create, start, die,
destroy), which time all three paths with one clock; ``product_completed_db`` ends at the
row's ``completed_at``. The stages split each run at those events: ``to_create`` (message,
claim, and the create call: the daemon stamps ``create`` once the container exists),
``create_to_start`` (the start call), ``start_to_die`` (the command itself),
``die_to_destroy`` (noticing the exit, logs and row updates, removal) and
``destroy_to_done`` (what runs after the removal, and the result's way back).

One worker process (prefork, concurrency 1) serves both Celery paths. It runs against the
database ``dcc_bench_dispatch`` (created and migrated on first use) and the Redis database
of ``BENCH_BROKER_URL`` (default ``redis://127.0.0.1:6379/7``, flushed at start); see
``bench/common.py`` for the environment variables. Figures are ``name=value`` lines, times
in milliseconds; ``overhead_*_pct`` is (product - plain) / plain * 100 at the median (the
goal: at most 15), and ``paired_product_minus_plain_*`` the median of the differences
between the product's and the plain task's runs of the same round, which load from
elsewhere on the machine disturbs less. Takes about a minute for 30 jobs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

DATABASE = "dcc_bench_dispatch"
PATHS = ("product", "plain", "raw")
GOAL_PCT = 15.0
STAGES = ("to_create", "create_to_start", "start_to_die", "die_to_destroy", "destroy_to_done")


class Runner:
    def __init__(self, env: common.BenchEnv, command: str, events: common.DockerEvents):
        from bench.plain_tasks import BENCH_LABEL, docker_client

        self.env = env
        self.command_line = command  # the product splits it with shlex, as done here
        self.command = shlex.split(command)
        self.events = events
        self.client = docker_client()
        self.tag = uuid.uuid4().hex[:8]
        self.labels = {BENCH_LABEL: f"dispatch-{self.tag}"}
        self.samples = common.Samples()
        self.pending_stages: list[tuple[str, str, float, float]] = []
        self.job_ids: set[str] = set()

    def run(self, path: str, index: int, record: bool) -> None:
        getattr(self, path)(index, record)

    def product(self, index: int, record: bool) -> None:
        from django_container_celery.models import ContainerJob

        job = ContainerJob.objects.create_job(
            name="bench-dispatch",
            docker_image=self.env.image,
            command=self.command_line,
            timeout_seconds=60,
            max_retries=0,
        )
        self.job_ids.add(str(job.pk))
        began = time.time()
        result = job.delay()
        sent = time.time()
        result.get(timeout=60)
        done = time.time()
        job.refresh_from_db()
        if job.status != "completed" or job.started_at is None or job.completed_at is None:
            raise RuntimeError(f"job {job.pk} ended {job.status}: {job.last_error}")
        if record:
            self.samples.add("product_delay_call", sent - began)
            self.samples.add("product_running", job.started_at.timestamp() - began)
            self.samples.add("product_completed", done - began)
            self.samples.add("product_completed_db", job.completed_at.timestamp() - began)
            self.pending_stages.append(("product", job.container_name, began, done))

    def plain(self, index: int, record: bool) -> None:
        from bench.plain_tasks import plain_run_container

        name = f"dccbench-{self.tag}-plain-{index}"
        began = time.time()
        result = plain_run_container.delay(self.env.image, self.command, name, self.labels)
        sent = time.time()
        value = result.get(timeout=60)
        done = time.time()
        if value["exit_code"] != 0:
            raise RuntimeError(f"plain task {name} exited {value['exit_code']}")
        if record:
            self.samples.add("plain_delay_call", sent - began)
            self.samples.add("plain_running", float(value["started"]) - began)
            self.samples.add("plain_completed", done - began)
            self.pending_stages.append(("plain", name, began, done))

    def raw(self, index: int, record: bool) -> None:
        from bench.plain_tasks import run_container

        name = f"dccbench-{self.tag}-raw-{index}"
        began = time.time()
        started, exit_code = run_container(
            self.client, self.env.image, self.command, name, self.labels
        )
        done = time.time()
        if exit_code != 0:
            raise RuntimeError(f"raw container {name} exited {exit_code}")
        if record:
            self.samples.add("raw_running", started - began)
            self.samples.add("raw_completed", done - began)
            self.pending_stages.append(("raw", name, began, done))

    def stages(self) -> None:
        for path, name, began, done in self.pending_stages:
            common.stage_samples(self.samples, path, self.events, name, began, done)


def pct_over(product: float, baseline: float) -> float:
    return (product - baseline) / baseline * 100 if baseline else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30, help="measured runs of each path")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs of each path")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="POLL_INTERVAL of the product worker (only canvas steps use it)",
    )
    parser.add_argument("--command", default="true", help="command run in each container")
    args = parser.parse_args(argv)

    overrides = {"MAX_CONCURRENT_JOBS": 8, "POLL_INTERVAL": args.poll_interval}
    wall = time.monotonic()
    env = common.prepare(DATABASE, overrides)

    from bench.plain_tasks import BENCH_LABEL, docker_client

    client = docker_client()
    common.reset_jobs(client, BENCH_LABEL)
    job_ids: set[str] = set()
    try:
        with common.worker_and_events(env, "bench-dispatch", concurrency=1) as (_, events):
            runner = Runner(env, args.command, events)
            job_ids = runner.job_ids
            for index in range(args.warmup + args.jobs):
                shift = index % len(PATHS)
                for path in PATHS[shift:] + PATHS[:shift]:
                    runner.run(path, index, record=index >= args.warmup)
            time.sleep(0.5)  # the last events reach the stream
    finally:
        common.remove_containers(client, job_ids, BENCH_LABEL)
    runner.stages()

    samples = runner.samples
    common.emit("jobs", args.jobs)
    common.emit("command", args.command)
    common.emit("poll_interval_s", args.poll_interval)
    common.emit("worker_concurrency", 1)
    samples.emit(
        [
            f"{path}_{stage}"
            for path in PATHS
            for stage in ("running", "completed", "running_docker")
        ]
        + ["product_completed_db", "product_delay_call", "plain_delay_call"]
    )
    for path in PATHS:
        for stage in STAGES:
            common.emit(f"{path}_stage_{stage}_p50_ms", samples.p(f"{path}_stage_{stage}", 50))
    running = pct_over(samples.p("product_running", 50), samples.p("plain_running", 50))
    completed = pct_over(samples.p("product_completed", 50), samples.p("plain_completed", 50))
    common.emit(
        "celery_over_raw_completed_p50_ms",
        samples.p("plain_completed", 50) - samples.p("raw_completed", 50),
    )
    common.emit(
        "product_over_plain_completed_p50_ms",
        samples.p("product_completed", 50) - samples.p("plain_completed", 50),
    )
    for stage in ("running", "completed"):
        # Runs of one round are seconds apart: their differences cancel slower drifts.
        pairs = zip(
            samples.values[f"product_{stage}"], samples.values[f"plain_{stage}"], strict=True
        )
        diffs = [product - plain for product, plain in pairs]
        common.emit(
            f"paired_product_minus_plain_{stage}_p50_ms", common.percentile(diffs, 50) * 1000
        )
    common.emit("overhead_running_p50_pct", running)
    common.emit("overhead_completed_p50_pct", completed)
    common.emit("goal_overhead_pct", GOAL_PCT)
    common.emit("goal_met", "yes" if max(running, completed) <= GOAL_PCT else "no")
    common.emit("wall_s", time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
