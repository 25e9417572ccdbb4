"""End-to-end throughput: 300 short container jobs through one worker of concurrency 4.

Usage, from the repository root, with PostgreSQL, Redis and Docker up::

    python -m bench.throughput [--jobs 300] [--rounds 4] [--concurrency 4]
                               [--poll-interval 1.0] [--budget 115]

One prefork worker (concurrency 4) serves both kinds of jobs:

* ``product``: the jobs are created first (not timed); then every one is queued with
  ``job.delay()`` in a loop, and the time runs from the first ``delay()`` until the
  database counts all of them final (``product_jobs_per_s``; ``product_results_jobs_per_s``
  runs until all their Celery results are stored instead).
* ``plain``: the baseline, the plain Celery task of ``bench/plain_tasks.py`` (docker-py
  ``containers.run(detach=True)``, ``wait()``, ``remove()``), sent with ``delay()`` in a
  loop and timed from the first ``delay()`` until all results are stored.

This machine is shared, and the Docker daemon's speed drifts with whatever else runs. So
the jobs of each kind are split into ``--rounds`` batches (default 4) run in the order
product, plain, plain, product, product, plain, ... (ABBA ABBA), which cancels a steady
drift and spreads bursts of load over both kinds; each rate is all its jobs over the sum
of its rounds' times, and ``*_round_jobs_per_s`` show the spread. ``--rounds 1`` queues
all jobs of a kind at once, product first.

Both run ``true`` in the test image with network "none". A few unmeasured jobs of each kind
warm up the pool processes first. ``throughput_ratio`` is product / plain (the goal is at
least 0.9). The product worker runs with ``MAX_CONCURRENT_JOBS`` 8, so the app's own limit
never holds back the four pool processes, and ``POLL_INTERVAL`` from ``--poll-interval``
(default 1.0 s, the app's default), which only canvas steps use: the run task returns once
its container runs, and the worker's watcher records each exit from Docker's events.

Checks printed with the figures: ``*_containers_per_job`` (containers the daemon created
per job, from its event stream; 1.0 means no duplicate launch), ``product_attempts_not_1``
and ``product_distinct_execution_ids`` (from the rows), ``*_max_running_containers`` (most
containers running at once) and ``containers_left`` (containers of this run still present
at the end; should be 0).

The worker runs against the database ``dcc_bench_throughput`` (created and migrated on
first use) and the Redis database of ``BENCH_BROKER_URL`` (default
``redis://127.0.0.1:6379/7``, flushed at start); see ``bench/common.py``.

Time: this machine's Docker daemon starts roughly 2-8 short containers a second depending
on its load, so 300 jobs of each kind take 80-300 s. To keep the whole run within
``--budget`` seconds (default 115), each round is sized from the rate seen so far (the
first from the warm-up, which errs low): an even share of the jobs still wanted, or fewer
(a multiple of ten, at least 20 of each kind) when that would not fit. ``jobs`` is what
ran of each kind, ``round_sizes`` how it was split and ``jobs_requested`` what was asked.
``--budget 0`` always runs ``--jobs``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

DATABASE = "dcc_bench_throughput"
GOAL_RATIO = 0.9
# Fitting the budget: a margin on the measured rate, the time the end takes (leftover
# check, worker stop), and the fewest jobs of each kind in a round.
SLACK = 1.3
TAIL_SECONDS = 6.0
MIN_ROUND = 20
ROUND_TIMEOUT = 150.0
PRODUCT_NAME = "bench-throughput"


def round_size(
    wanted: int, rounds_left: int, pair_rate: float, budget: float, started: float
) -> int:
    """Jobs of each kind for the next round: an even share of the ``wanted`` jobs still to
    run, cut (to a multiple of ten, at least MIN_ROUND) when the rounds left would not end
    within ``budget`` seconds of ``started`` (monotonic clock) at ``pair_rate``, the jobs
    per second of both kinds together seen so far."""
    share = math.ceil(wanted / rounds_left)
    if budget <= 0:
        return share
    seconds_left = started + budget - time.monotonic() - TAIL_SECONDS
    fitting = int(seconds_left / rounds_left * pair_rate / 2 / SLACK) // 10 * 10
    return max(MIN_ROUND, min(share, fitting))


def run_product(env: common.BenchEnv, count: int, name: str) -> dict[str, float]:
    """Create ``count`` jobs, then queue them with delay(); time until all are final (and
    until all results are stored)."""
    from django_container_celery import states
    from django_container_celery.models import ContainerJob

    jobs = [
        ContainerJob.objects.create_job(
            name=name, docker_image=env.image, command="true", timeout_seconds=120, max_retries=0
        )
        for _ in range(count)
    ]
    began = time.time()
    task_ids = [job.delay().id for job in jobs]
    queued = time.time()
    final = ContainerJob.objects.filter(name=name, status__in=states.FINAL)
    if not common.wait_until(lambda: final.count() >= count, ROUND_TIMEOUT):
        raise RuntimeError(f"only {final.count()} of {count} jobs final")
    done = time.time()
    if not common.wait_until(lambda: common.results_ready(env.app, task_ids) >= count, 30):
        raise RuntimeError(f"results missing: {common.results_state(env.app, task_ids)}")
    return {"began": began, "queued": queued, "done": done, "results": time.time()}


def run_plain(
    env: common.BenchEnv, count: int, prefix: str, labels: dict[str, str]
) -> dict[str, float]:
    """Send ``count`` plain tasks with delay(); time until all results are stored."""
    from bench.plain_tasks import plain_run_container

    began = time.time()
    task_ids = [
        plain_run_container.delay(env.image, ["true"], f"{prefix}{index}", labels).id
        for index in range(count)
    ]
    queued = time.time()
    if not common.wait_until(
        lambda: common.results_ready(env.app, task_ids) >= count, ROUND_TIMEOUT
    ):
        raise RuntimeError(f"plain results missing: {common.results_state(env.app, task_ids)}")
    done = time.time()
    states = common.results_state(env.app, task_ids)
    return {
        "began": began,
        "queued": queued,
        "done": done,
        "results": done,
        "failed": count - states["SUCCESS"],
    }


def total(rounds: list[dict[str, float]], end: str, start: str = "began") -> float:
    return sum(part[end] - part[start] for part in rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs of each kind")
    parser.add_argument("--rounds", type=int, default=4, help="batches of each kind")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-concurrent-jobs", type=int, default=8)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument(
        "--budget",
        type=float,
        default=115.0,
        help="seconds of wall time the whole run should fit in; 0: never reduce --jobs",
    )
    args = parser.parse_args(argv)
    rounds = max(1, args.rounds)

    overrides = {
        "MAX_CONCURRENT_JOBS": args.max_concurrent_jobs,
        "POLL_INTERVAL": args.poll_interval,
    }
    wall = time.monotonic()
    env = common.prepare(DATABASE, overrides)

    from bench.plain_tasks import BENCH_LABEL, docker_client
    from django_container_celery.models import ContainerJob

    client = docker_client()
    common.reset_jobs(client, BENCH_LABEL)
    tag = uuid.uuid4().hex[:8]
    labels = {BENCH_LABEL: f"throughput-{tag}"}
    plain_prefix = f"dccbench-{tag}-run"
    product: list[dict[str, float]] = []
    plain: list[dict[str, float]] = []
    sizes: list[int] = []
    job_ids: set[str] = set()
    session = common.worker_and_events(env, "bench-throughput", concurrency=args.concurrency)
    try:
        with session as (_, events):
            # One job per pool process of each kind (the pool hands idle processes work first).
            warmup = args.concurrency
            run_product(env, warmup, "bench-warmup")
            warm = run_plain(env, warmup, f"dccbench-{tag}-warmup-", labels)
            pair_rate = warmup / (warm["done"] - warm["began"])  # a cautious first guess
            wanted = args.jobs
            for index in range(rounds):
                size = round_size(wanted, rounds - index, pair_rate, args.budget, wall)
                sizes.append(size)
                kinds = ("product", "plain") if index % 2 == 0 else ("plain", "product")
                for kind in kinds:
                    if kind == "product":
                        product.append(run_product(env, size, f"{PRODUCT_NAME}-{index}"))
                    else:
                        plain.append(run_plain(env, size, f"{plain_prefix}{index}-", labels))
                pair_rate = 2 * sum(sizes) / (total(product, "done") + total(plain, "done"))
                wanted -= size
            job_ids = {str(pk) for pk in ContainerJob.objects.values_list("pk", flat=True)}
            common.wait_until(
                lambda: not common.bench_containers(client, job_ids, BENCH_LABEL), 10, 0.2
            )
            left = len(common.bench_containers(client, job_ids, BENCH_LABEL))
            time.sleep(0.5)  # the last events reach the stream
    finally:
        common.remove_containers(client, job_ids, BENCH_LABEL)

    measured = ContainerJob.objects.filter(name__startswith=PRODUCT_NAME)
    product_names = [job.container_name for job in measured]
    product_prefixes = tuple(f"dcc-{job.pk}-a" for job in measured)
    plain_names = [
        f"{plain_prefix}{index}-{number}"
        for index, size in enumerate(sizes)
        for number in range(size)
    ]
    jobs = sum(sizes)
    product_s = total(product, "done")
    plain_s = total(plain, "done")
    product_rate = jobs / product_s
    plain_rate = jobs / plain_s
    ratio = product_rate / plain_rate

    def round_rates(parts: list[dict[str, float]]) -> str:
        pairs = zip(sizes, parts, strict=True)
        return ",".join(f"{size / (part['done'] - part['began']):.2f}" for size, part in pairs)

    common.emit("jobs", jobs)
    common.emit("jobs_requested", args.jobs)
    common.emit("rounds", rounds)
    common.emit("round_sizes", ",".join(map(str, sizes)))
    common.emit("worker_concurrency", args.concurrency)
    common.emit("max_concurrent_jobs", args.max_concurrent_jobs)
    common.emit("poll_interval_s", args.poll_interval)
    common.emit("product_seconds", product_s)
    common.emit("product_enqueue_seconds", total(product, "queued"))
    common.emit("product_jobs_per_s", f"{product_rate:.2f}")
    common.emit("product_results_jobs_per_s", f"{jobs / total(product, 'results'):.2f}")
    common.emit("product_round_jobs_per_s", round_rates(product))
    common.emit("plain_seconds", plain_s)
    common.emit("plain_enqueue_seconds", total(plain, "queued"))
    common.emit("plain_jobs_per_s", f"{plain_rate:.2f}")
    common.emit("plain_round_jobs_per_s", round_rates(plain))
    common.emit("throughput_ratio", f"{ratio:.3f}")
    common.emit("goal_ratio", GOAL_RATIO)
    common.emit("goal_met", "yes" if ratio >= GOAL_RATIO else "no")
    common.emit("product_completed", measured.filter(status="completed").count())
    common.emit("product_attempts_not_1", measured.exclude(attempt=1).count())
    common.emit(
        "product_distinct_execution_ids",
        measured.exclude(execution_id="").values("execution_id").distinct().count(),
    )
    common.emit("plain_failed", int(sum(part["failed"] for part in plain)))
    product_creates = events.count("create", product_prefixes)
    plain_creates = events.count("create", (plain_prefix,))
    common.emit("product_containers_per_job", f"{product_creates / jobs:.3f}")
    common.emit("plain_containers_per_job", f"{plain_creates / jobs:.3f}")
    common.emit("product_max_running_containers", events.max_running(product_names))
    common.emit("plain_max_running_containers", events.max_running(plain_names))
    common.emit("containers_left", left)
    common.emit("wall_s", time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
