"""What one Prometheus scrape of ``django_container_celery.metrics`` costs at 200,000 jobs,
and that the cost does not grow with the finished jobs kept.

Creates its own PostgreSQL database (dropped at the end) and fills it with SQL, in two
steps:

1. 20,000 jobs: 6,000 not yet final (queued, a quarter of them scheduled later, retrying,
   pending, running, launching), 6,000 that finished in the last hour (a busy hour: 5 %
   failed, 3 % cancelled) and 8,000 finished earlier (2 % failed, 1 % cancelled), with one
   attempt row per ended attempt and a retried first attempt for one job in ten;
2. 180,000 more jobs finished earlier, in the same proportions, with their attempts:
   200,000 jobs, as a month of history kept by CLEANUP_AFTER_DAYS looks.

After each step it times, in turn within each round so that a busy machine weighs on all
alike: the baseline (``SELECT count(*)`` of the job table, the cheapest question about the
whole table), the collector (``generate_latest`` of a registry holding it) and the view,
through Django's test client as a staff user (session, permission check and rendering
included). Wall-clock times on a shared machine move with its other load, so each step
also reports the database server's own execution time (EXPLAIN ANALYZE) of a scrape's
statements and of the baseline, and the Python CPU time of a scrape.

Prints ``name=value`` lines: p50 and max in ms, statement counts, the slowest statements
at 200,000 jobs with their plans (scan nodes), how many statements read the job or
attempt table whole (0), and the ratios 200k / 20k of the database time of a scrape
(bounded: the finished jobs kept add little) and of the baseline (which grows with the
table).

Environment (optional): BENCH_PG_URL, the server and credentials to use (default
postgres://dcc:dcc@127.0.0.1:5432/dcc; the database name is replaced); BENCH_SCRAPES,
timed scrapes of each kind (15).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402 - after the path is set

DATABASE = "dcc_bench_metrics"
SERVER_URL = os.environ.get("BENCH_PG_URL", "postgres://dcc:dcc@127.0.0.1:5432/dcc")
SCRAPES = int(os.environ.get("BENCH_SCRAPES", "15"))
OPEN_JOBS = 6000
WINDOW_JOBS = 6000
FIRST_STEP = 20_000
ROWS = 200_000


def server_database(name: str | None) -> str:
    return urlunparse(urlparse(SERVER_URL)._replace(path=f"/{name or ''}"))


def recreate_database() -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    return server_database(DATABASE)


def drop_database() -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))


# Job i (its number is kept in description): 1..OPEN_JOBS are not final, created i * 0.5 s
# ago; the next WINDOW_JOBS finished in the last hour; the rest finished earlier, one every
# 12 s going back (about a month at 200,000 jobs).
JOBS_SQL = """
WITH g AS (
    SELECT i,
        CASE
            WHEN i <= %(open)s THEN (CASE
                WHEN i %% 20 < 10 THEN 'queued'
                WHEN i %% 20 < 12 THEN 'retrying'
                WHEN i %% 20 < 16 THEN 'pending'
                WHEN i %% 20 < 19 THEN 'running'
                ELSE 'launching' END)
            WHEN i <= %(open)s + %(window)s THEN (CASE
                WHEN i %% 100 < 5 THEN 'failed'
                WHEN i %% 100 < 8 THEN 'cancelled'
                ELSE 'completed' END)
            ELSE (CASE
                WHEN i %% 100 < 2 THEN 'failed'
                WHEN i %% 100 < 3 THEN 'cancelled'
                ELSE 'completed' END)
        END AS status,
        now() - CASE
            WHEN i <= %(open)s THEN make_interval(secs => i * 0.5)
            WHEN i <= %(open)s + %(window)s
                THEN make_interval(secs => (i - %(open)s) * 0.55 + 300)
            ELSE interval '1 hour' + make_interval(secs => (i - %(open)s - %(window)s) * 12)
        END AS created
    FROM generate_series(%(first)s, %(last)s) AS i
)
INSERT INTO {jobs} (
    id, name, description, docker_image, command, working_directory, environment,
    bind_mounts, memory_limit, cpu_limit, timeout_seconds, created_at, updated_at, status,
    priority, queued_at, scheduled_for, launched_at, retry_count, max_retries, last_error,
    last_error_at, retry_strategy, retry_exit_codes, claimed_by, claimed_at,
    lease_expires_at, attempt, assigned_host_id, docker_host_id, dispatched_at,
    execution_id, exit_code, started_at, completed_at, stdout_log, stderr_log,
    celery_task_id, stop_pending, takeover_count, lane, memory_retry_factor,
    attempts_without_outcome, needs_attention
)
SELECT
    gen_random_uuid(),
    'job-' || i,
    i::text,
    'registry.local/report:3',
    'run ' || i,
    '',
    '{{}}'::jsonb,
    '[]'::jsonb,
    CASE WHEN i %% 3 = 0 THEN 512 END,
    CASE WHEN i %% 4 = 0 THEN 0.5 END,
    3600,
    created,
    created,
    status,
    (ARRAY[0, 20, 50, 50, 79, 80, 100])[1 + i %% 7],
    CASE WHEN status <> 'pending' THEN created END,
    CASE
        WHEN status = 'retrying' THEN created + interval '30 seconds'
        WHEN status = 'queued' AND i %% 4 = 0 THEN now() + interval '1 hour'
    END,
    CASE WHEN status IN ('completed', 'failed', 'cancelled', 'running')
         THEN created + interval '2 seconds' END,
    CASE WHEN status IN ('failed', 'retrying') THEN 1 ELSE 0 END,
    3,
    CASE WHEN status IN ('failed', 'retrying') THEN 'container exited with code 1' ELSE '' END,
    CASE WHEN status IN ('failed', 'retrying') THEN created + interval '1 minute' END,
    '',
    '[]'::jsonb,
    CASE WHEN status IN ('running', 'launching') THEN 'bench-worker' ELSE '' END,
    CASE WHEN status IN ('running', 'launching') THEN created + interval '1 second' END,
    CASE WHEN status IN ('running', 'launching') THEN now() + interval '1 minute' END,
    CASE WHEN status IN ('pending', 'queued') THEN 0 WHEN i %% 10 = 0 THEN 2 ELSE 1 END,
    CASE WHEN status NOT IN ('pending', 'queued') THEN %(host)s + i %% 3 END,
    NULL,
    NULL,
    '',
    CASE WHEN status = 'completed' THEN 0 WHEN status = 'failed' THEN 1 END,
    CASE WHEN status IN ('completed', 'failed', 'running') THEN created + interval '2 seconds'
    END,
    CASE WHEN status IN ('completed', 'failed', 'cancelled')
         THEN created + interval '2 seconds' + make_interval(secs => 5 + i %% 290) END,
    '',
    '',
    '',
    status = 'failed' AND i %% 50 = 0,
    CASE WHEN i %% 97 = 0 THEN 1 ELSE 0 END,
    '',
    NULL,
    0,
    false
FROM g
"""

# One row per ended attempt of the jobs just added: the current attempt of every finished
# or retrying job, and a first attempt, retried, of those on their second.
ATTEMPTS_SQL = """
INSERT INTO {attempts} (
    job_id, attempt, host_id, reason, exit_code, error, claimed_at, started_at, ended_at,
    retried
)
SELECT j.id, a.n, j.assigned_host_id,
    CASE
        WHEN a.n < j.attempt THEN 'vanished'
        WHEN j.status = 'completed' THEN 'exited'
        WHEN j.status = 'cancelled' THEN 'cancelled'
        WHEN j.status = 'retrying' THEN 'launch_failed'
        ELSE (ARRAY['exited', 'timed_out', 'launch_failed', 'vanished', 'unfinishable'])
             [1 + (j.description::int / 100) %% 5]
    END,
    CASE WHEN j.status = 'completed' AND a.n = j.attempt THEN 0
         WHEN j.status = 'failed' AND a.n = j.attempt THEN 1 END,
    CASE WHEN j.status = 'completed' AND a.n = j.attempt THEN '' ELSE 'ended' END,
    j.created_at + interval '1 second',
    CASE WHEN j.status = 'retrying' THEN NULL ELSE j.created_at + interval '2 seconds' END,
    COALESCE(j.completed_at, j.created_at + interval '20 seconds')
        - make_interval(secs => (j.attempt - a.n) * 10),
    a.n < j.attempt OR j.status = 'retrying'
FROM {jobs} j
CROSS JOIN LATERAL generate_series(1, j.attempt) AS a(n)
WHERE j.description::int BETWEEN %(first)s AND %(last)s
  AND (j.status IN ('completed', 'failed', 'cancelled', 'retrying')
       OR (j.status IN ('running', 'launching') AND a.n < j.attempt))
"""


def create_hosts() -> int:
    from django_container_celery.models import ExecutorHost

    first = ExecutorHost.objects.create(
        name="bench-a", max_concurrent_jobs=5000, memory_capacity_mb=2_000_000, cpu_capacity=4000
    )
    ExecutorHost.objects.create(name="bench-b", max_concurrent_jobs=5000)
    ExecutorHost.objects.create(name="bench-c", max_concurrent_jobs=5000, is_active=False)
    return first.pk


def fill(first: int, last: int, host: int) -> None:
    """Add jobs ``first`` to ``last`` and their attempts."""
    from django.db import connection

    from django_container_celery.models import ContainerJob, JobAttempt

    jobs = connection.ops.quote_name(ContainerJob._meta.db_table)
    attempts = connection.ops.quote_name(JobAttempt._meta.db_table)
    numbers = {"first": first, "last": last}
    with connection.cursor() as cursor:
        cursor.execute(
            JOBS_SQL.format(jobs=jobs),
            {**numbers, "open": OPEN_JOBS, "window": WINDOW_JOBS, "host": host},
        )
        cursor.execute(ATTEMPTS_SQL.format(attempts=attempts, jobs=jobs), numbers)
        # As autovacuum leaves long-lived tables: statistics fresh, visibility map set.
        cursor.execute(f"VACUUM ANALYZE {jobs}")
        cursor.execute(f"VACUUM ANALYZE {attempts}")


PLAN_NODE = re.compile(
    r"(Seq Scan|Parallel Seq Scan|Index Only Scan|Index Scan|Bitmap Index Scan)(?: using (\w+))?"
)
SEQ_SCAN = re.compile(r"Seq Scan on (\w+)")


def plan_of(sql: str) -> str:
    """The scan nodes of a statement's plan, e.g. ``Index_Scan_using_dcc_attempt_ended_idx``."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        lines = [row[0] for row in cursor.fetchall()]
    nodes = []
    for line in lines:
        match = PLAN_NODE.search(line)
        if match:
            nodes.append(" ".join(filter(None, [match.group(1), match.group(2)])))
    return "+".join(dict.fromkeys(nodes)).replace(" ", "_") or "none"


def seq_scanned(sql: str) -> list[str]:
    """The tables a statement's plan reads whole."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        lines = [row[0] for row in cursor.fetchall()]
    return [match.group(1) for line in lines for match in SEQ_SCAN.finditer(line)]


def database_ms(statements: list[str], rounds: int) -> float:
    """The database server's own execution time for these statements together (EXPLAIN
    ANALYZE), median of ``rounds``: what the scrape costs the server, without the
    network, Python or waits for the CPU."""
    import json

    from django.db import connection

    totals = []
    for _ in range(rounds):
        total = 0.0
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + sql)
                plan = cursor.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
                total += float(plan[0]["Execution Time"])
        totals.append(total)
    return statistics.median(totals)


def interleaved(actions: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each action, run in turn each round (after two warm-up rounds), so
    the load of a shared machine weighs on all of them alike."""
    spent: dict[str, list[float]] = {name: [] for name in actions}
    for round_number in range(rounds + 2):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            if round_number >= 2:
                spent[name].append((time.perf_counter() - start) * 1000)
    return spent


def main() -> None:
    started = time.perf_counter()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ.pop("DCC_TEST_DATABASE", None)
    os.environ["DATABASE_URL"] = recreate_database()

    import django

    django.setup()

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection, connections
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from prometheus_client import CollectorRegistry, generate_latest

    from django_container_celery.metrics import ContainerJobCollector
    from django_container_celery.models import ContainerJob, JobAttempt

    registry = CollectorRegistry()
    registry.register(ContainerJobCollector())
    client = Client()

    def count_all() -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {ContainerJob._meta.db_table}")
            cursor.fetchone()

    def load_view() -> None:
        # tests.urls serves metrics_view at /metrics/, as a project's urls.py would.
        response = client.get("/metrics/")
        assert response.status_code == 200, response.status_code

    def step(label: str) -> tuple[float, float]:
        """Time the baseline, the collector and the view now; return the database time of
        the baseline and of a scrape."""
        emit(f"{label}_rows", ContainerJob.objects.count())
        emit(f"{label}_attempt_rows", JobAttempt.objects.count())
        spent = interleaved(
            {
                "baseline_count": count_all,
                "scrape": lambda: generate_latest(registry),
                "view": load_view,
            },
            SCRAPES,
        )
        for name, values in spent.items():
            emit(f"{label}_{name}_p50_ms", statistics.median(values))
            emit(f"{label}_{name}_max_ms", max(values))
        cpu = []
        for _ in range(SCRAPES):
            start = time.process_time()
            with CaptureQueriesContext(connection) as captured:
                generate_latest(registry)
            cpu.append((time.process_time() - start) * 1000)
        emit(f"{label}_scrape_python_cpu_p50_ms", statistics.median(cpu))
        statements = [query["sql"] for query in captured.captured_queries]
        emit(f"{label}_scrape_statements", len(statements))
        server = database_ms(statements, SCRAPES)
        baseline = database_ms([f"SELECT count(*) FROM {ContainerJob._meta.db_table}"], SCRAPES)
        emit(f"{label}_baseline_count_db_ms", baseline)
        emit(f"{label}_scrape_db_ms", server)
        return baseline, server

    try:
        call_command("migrate", verbosity=0)
        user = get_user_model().objects.create_superuser("bench", password="bench")
        client.force_login(user)
        host = create_hosts()
        fill_start = time.perf_counter()
        fill(1, FIRST_STEP, host)
        small_baseline, small_scrape = step("at_20k")
        fill(FIRST_STEP + 1, ROWS, host)
        emit("fill_seconds", time.perf_counter() - fill_start)
        big_baseline, big_scrape = step("at_200k")

        text = generate_latest(registry)
        emit("scrape_bytes", len(text))
        emit("scrape_series", sum(1 for line in text.splitlines() if not line.startswith(b"#")))

        queries: list[dict[str, Any]] = []
        with CaptureQueriesContext(connection) as captured:
            generate_latest(registry)
        queries = list(captured.captured_queries)
        slowest = sorted(queries, key=lambda query: float(query["time"]), reverse=True)[:3]
        for rank, query in enumerate(slowest, start=1):
            emit(f"at_200k_slowest_{rank}_ms", float(query["time"]) * 1000)
            emit(f"at_200k_slowest_{rank}_plan", plan_of(query["sql"]))
        big_tables = {ContainerJob._meta.db_table, JobAttempt._meta.db_table}
        scanned = [table for query in queries for table in seq_scanned(query["sql"])]
        emit("at_200k_seq_scans_of_jobs_or_attempts", sum(t in big_tables for t in scanned))

        # Database time: the wall clock of a shared machine moves with its other load.
        emit("scrape_db_200k_over_20k", big_scrape / small_scrape)
        emit("baseline_db_200k_over_20k", big_baseline / small_baseline)
        emit("at_200k_scrape_db_over_baseline_db", big_scrape / big_baseline)
    finally:
        connections.close_all()
        drop_database()
    emit("total_seconds", time.perf_counter() - started)


if __name__ == "__main__":
    main()
