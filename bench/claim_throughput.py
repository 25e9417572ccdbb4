"""Claim throughput from PostgreSQL: jobs claimed per second at 10k and at 1M queued rows.

Runs ``claims.claim_next`` (no executor: nothing is launched) in 1 and in 4 processes
against a queue of 10,000 rows and one of 1,000,000 rows, and prints ``name=value`` lines:

    claims_per_s_10k_1proc, claims_per_s_10k_4proc, claims_per_s_1m_1proc,
    claims_per_s_1m_4proc, ratio_1m_vs_10k_1proc, ratio_1m_vs_10k_4proc,
    sql_statements_per_claim (as the client sends them, BEGIN and COMMIT included),
    claim_update_ms_10k, claim_update_ms_1m (server-side execution time of the claiming
    UPDATE, median of EXPLAIN ANALYZE runs that are rolled back)

The two queues live in two databases of their own, ``dcc_bench_claims`` and
``dcc_bench_claims_1m`` (``BENCH_DATABASE`` renames them), on the server of
``DATABASE_URL`` (default postgres://dcc:dcc@127.0.0.1:5432/dcc): dropped if they exist,
created, migrated, and dropped again at the end. Runs alternate between the two sizes and
each figure is the best of several runs, so a burst of load from elsewhere on the machine
lowers one run rather than one side of the ratio.

    python bench/claim_throughput.py [--explain]

``--explain`` also prints EXPLAIN ANALYZE of one claim at each size on stderr.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_URL = os.environ.get("DATABASE_URL", "postgres://dcc:dcc@127.0.0.1:5432/dcc")
BENCH_DB = os.environ.get("BENCH_DATABASE", "dcc_bench_claims")
SIZES = {"10k": (BENCH_DB, 10_000), "1m": (f"{BENCH_DB}_1m", 1_000_000)}
# Each run claims this many jobs (split between the processes) or runs this long; the
# claimed rows are put back in the queue after every run.
CLAIMS_PER_RUN = 600
SECONDS_PER_RUN = 2.0
REPEATS = 5
PROCESSES = 4
UNLIMITED = 10**9


def url_for(database: str) -> str:
    return urlunparse(urlparse(SERVER_URL)._replace(path=f"/{database}"))


def admin(sql: str) -> None:
    """Run one statement outside a transaction on the server's main database."""
    import psycopg

    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql)


# Point the test settings at the bench database before Django reads them.
os.environ["DATABASE_URL"] = url_for(BENCH_DB)
os.environ.pop("DCC_TEST_DATABASE", None)
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"


def use_database(name: str) -> None:
    """Point Django's default connection (and any process forked later) at ``name``."""
    from django.db import connections

    connections.close_all()
    connections["default"].settings_dict["NAME"] = name


def setup_databases() -> None:
    import django

    django.setup()
    from django.core.management import call_command

    for name, _ in SIZES.values():
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin(f'CREATE DATABASE "{name}"')
        use_database(name)
        call_command("migrate", verbosity=0, interactive=False)


def drop_databases() -> None:
    from django.db import connections

    connections.close_all()
    for name, _ in SIZES.values():
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def job_table() -> str:
    from django_container_celery.models import ContainerJob

    return ContainerJob._meta.db_table


def load_rows(count: int) -> None:
    """Insert ``count`` queued jobs in one INSERT ... SELECT, then VACUUM ANALYZE."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {job_table()} (
                id, name, description, docker_image, command, working_directory,
                environment, bind_mounts, memory_limit, cpu_limit, timeout_seconds,
                created_at, updated_at, status, priority, queued_at, scheduled_for,
                launched_at, retry_count, max_retries, last_error, last_error_at,
                retry_strategy, retry_exit_codes, claimed_by, claimed_at, lease_expires_at,
                attempt, dispatched_at, execution_id, exit_code, started_at, completed_at,
                stdout_log, stderr_log, celery_task_id, created_by_id, assigned_host_id,
                docker_host_id, stop_pending, takeover_count, lane, memory_retry_factor,
                attempts_without_outcome, needs_attention
            )
            SELECT
                gen_random_uuid(), 'bench-' || g, '', 'busybox:latest', 'true', '',
                '{{}}'::jsonb, '[]'::jsonb, NULL, NULL, 3600,
                now(), now(), 'queued', floor(random() * 101)::int,
                now() - interval '1 day' + g * interval '1 millisecond', NULL,
                NULL, 0, 3, '', NULL,
                '', '[]'::jsonb, '', NULL, NULL,
                0, NULL, '', NULL, NULL, NULL,
                '', '', '', NULL, NULL,
                NULL, false, 0, '', NULL,
                0, false
            FROM generate_series(1, %s) AS g
            """,
            [count],
        )
    vacuum()


def vacuum() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {job_table()}")


def reset_claims() -> None:
    """Put every claimed job back in the queue, as it was before the run."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {job_table()} SET status = 'queued', claimed_by = '', claimed_at = NULL,
                lease_expires_at = NULL, attempt = 0, assigned_host_id = NULL,
                updated_at = now()
            WHERE status = 'launching'
            """
        )
    vacuum()


def claim_loop(worker_id: str, quota: int, seconds: float) -> tuple[int, float]:
    """Claim until ``quota`` jobs or ``seconds`` elapsed; (claims, elapsed seconds)."""
    from django_container_celery import claims

    claimed = 0
    began = time.perf_counter()
    end = began + seconds
    while claimed < quota and time.perf_counter() < end:
        if claims.claim_next(worker_id, max_concurrent=UNLIMITED) is None:
            break
        claimed += 1
    return claimed, time.perf_counter() - began


def _child(index: int, quota: int, barrier: Any, results: Any) -> None:
    from django.db import connection, connections

    try:
        connection.ensure_connection()
        barrier.wait(timeout=60)
        results.put(claim_loop(f"bench-{index}", quota, SECONDS_PER_RUN))
    except BaseException as exc:
        results.put(exc)
    finally:
        connections.close_all()


def measure(processes: int) -> float:
    """Jobs claimed per second in one run, all processes together."""
    from django.db import connections

    if processes == 1:
        claim_loop("bench-warmup", 20, SECONDS_PER_RUN)
        claimed, elapsed = claim_loop("bench-0", CLAIMS_PER_RUN, SECONDS_PER_RUN)
        reset_claims()
        return claimed / elapsed
    connections.close_all()  # no child may share the parent's socket
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    quota = CLAIMS_PER_RUN // processes
    procs = [
        ctx.Process(target=_child, args=(i, quota, barrier, results)) for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    failures = [item for item in outcomes if isinstance(item, BaseException)]
    if failures:
        raise RuntimeError(f"a claiming process failed: {failures[0]!r}")
    total = sum(claimed for claimed, _ in outcomes)
    slowest = max(elapsed for _, elapsed in outcomes)
    reset_claims()
    return total / slowest


def capture_claim(samples: int = 20) -> tuple[float, str]:
    """Statements per claim as the client sends them, and the claiming UPDATE's SQL."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_container_celery import claims

    with CaptureQueriesContext(connection) as captured:
        for _ in range(samples):
            claims.claim_next("bench-count", max_concurrent=UNLIMITED)
    reset_claims()
    update = next(q["sql"] for q in captured.captured_queries if "UPDATE" in q["sql"])
    return len(captured.captured_queries) / samples, update


def explain(update_sql: str) -> tuple[float, str]:
    """(execution ms, plan) of the claiming UPDATE, rolled back."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + update_sql)
        lines = [line for (line,) in cursor.fetchall()]
        transaction.set_rollback(True)
    ms = next(float(line.split()[2]) for line in lines if line.startswith("Execution Time"))
    return ms, "\n".join(lines)


def update_ms(samples: int = 30) -> tuple[float, str]:
    _, update_sql = capture_claim(1)
    timings = [explain(update_sql) for _ in range(samples)]
    return statistics.median(ms for ms, _ in timings), timings[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--explain", action="store_true", help="print the claim's plans")
    options = parser.parse_args()

    started = time.perf_counter()
    setup_databases()
    try:
        figures: dict[str, float] = {}
        for label, (name, rows) in SIZES.items():
            use_database(name)
            load_rows(rows)
            if label == "10k":
                figures["sql_statements_per_claim"] = capture_claim()[0]
        runs: dict[str, list[float]] = {}
        for _ in range(REPEATS):
            for label, (name, _) in SIZES.items():
                use_database(name)
                for processes in (1, PROCESSES):
                    key = f"claims_per_s_{label}_{processes}proc"
                    runs.setdefault(key, []).append(measure(processes))
        for label, (name, _) in SIZES.items():
            use_database(name)
            ms, plan = update_ms()
            figures[f"claim_update_ms_{label}"] = ms
            if options.explain:
                print(f"-- claim at {label} rows:\n{plan}\n", file=sys.stderr)
    finally:
        drop_databases()

    best = {key: max(values) for key, values in runs.items()}
    results = {
        "claims_per_s_10k_1proc": best["claims_per_s_10k_1proc"],
        "claims_per_s_10k_4proc": best[f"claims_per_s_10k_{PROCESSES}proc"],
        "claims_per_s_1m_1proc": best["claims_per_s_1m_1proc"],
        "claims_per_s_1m_4proc": best[f"claims_per_s_1m_{PROCESSES}proc"],
    }
    results["ratio_1m_vs_10k_1proc"] = (
        results["claims_per_s_1m_1proc"] / results["claims_per_s_10k_1proc"]
    )
    results["ratio_1m_vs_10k_4proc"] = (
        results["claims_per_s_1m_4proc"] / results["claims_per_s_10k_4proc"]
    )
    results.update(figures)
    for name, value in results.items():
        print(f"{name}={value:.2f}")
    print(f"total_s={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
