"""How fast the container-job changelist loads with 200,000 jobs in the table.

Creates its own PostgreSQL database (dropped at the end), fills it with jobs of mixed
status, priority and host, then loads the admin changelist through Django's test client:
unfiltered, filtered by queue status and by status, and searched. Each page is loaded
twice in the same run: through the app's admin, and through the same admin with Django's
default paginator and ``show_full_result_count=True`` (the baseline), on a second admin
site. Prints ``name=value`` lines.

Environment (optional): BENCH_PG_URL, the server and credentials to use (default
postgres://dcc:dcc@127.0.0.1:5432/dcc; the database name is replaced); BENCH_ROWS (200000);
BENCH_LOADS, timed loads per page (5).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "dcc_bench_admin"
SERVER_URL = os.environ.get("BENCH_PG_URL", "postgres://dcc:dcc@127.0.0.1:5432/dcc")
ROWS = int(os.environ.get("BENCH_ROWS", "200000"))
LOADS = int(os.environ.get("BENCH_LOADS", "5"))


def emit(name: str, value: Any) -> None:
    if isinstance(value, float):
        value = f"{value:.1f}"
    print(f"{name}={value}", flush=True)


def recreate_database() -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    return urlunparse(urlparse(SERVER_URL)._replace(path=f"/{DATABASE}"))


def drop_database() -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))


# One statement fills the table: generate_series is far faster than bulk_create for 200k
# rows. One job every 30 seconds over ~70 days, statuses spread like a busy queue: mostly
# finished, some waiting, a few running, failed or cancelled.
FILL_SQL = """
WITH g AS (
    SELECT i,
        CASE
            WHEN i %% 100 < 62 THEN 'completed'
            WHEN i %% 100 < 72 THEN 'failed'
            WHEN i %% 100 < 80 THEN 'queued'
            WHEN i %% 100 < 83 THEN 'retrying'
            WHEN i %% 100 < 90 THEN 'pending'
            WHEN i %% 100 < 92 THEN 'running'
            WHEN i %% 100 < 93 THEN 'launching'
            ELSE 'cancelled'
        END AS status,
        now() - make_interval(secs => i * 30) AS created
    FROM generate_series(1, %(rows)s) AS i
)
INSERT INTO {table} (
    id, name, description, docker_image, command, working_directory, environment,
    bind_mounts, timeout_seconds, created_at, updated_at, status, priority, queued_at,
    scheduled_for, launched_at, retry_count, max_retries, last_error, last_error_at,
    retry_strategy, retry_exit_codes, claimed_by, attempt, assigned_host_id, docker_host_id,
    execution_id, exit_code, started_at, completed_at, stdout_log, stderr_log, celery_task_id
)
SELECT
    gen_random_uuid(),
    (ARRAY['report', 'thumbnail', 'export', 'reindex', 'backup'])[1 + i %% 5] || '-' || i,
    '',
    (ARRAY['busybox:latest', 'registry.local/report:3', 'registry.local/search:7'])[1 + i %% 3],
    'sh -c "run ' || i || '"',
    '',
    jsonb_build_object('MODE', 'batch', 'API_TOKEN', 'tok-' || i),
    '[]'::jsonb,
    3600,
    created,
    created,
    status,
    (ARRAY[20, 50, 50, 50, 80])[1 + i %% 5],
    CASE WHEN status <> 'pending' THEN created END,
    CASE
        WHEN status = 'retrying' THEN now() + interval '5 minutes'
        WHEN status = 'queued' AND i %% 4 = 0 THEN now() + interval '1 hour'
    END,
    CASE WHEN status IN ('completed', 'running', 'cancelled')
              OR (status = 'failed' AND i %% 2 = 0) THEN created + interval '2 seconds' END,
    CASE WHEN status IN ('failed', 'retrying') THEN 1 ELSE 0 END,
    3,
    CASE WHEN status = 'failed' THEN 'exit code 1' ELSE '' END,
    CASE WHEN status = 'failed' THEN created + interval '1 minute' END,
    '',
    '[]'::jsonb,
    CASE WHEN status IN ('running', 'launching') THEN 'bench-worker' ELSE '' END,
    CASE WHEN status IN ('pending', 'queued') THEN 0 ELSE 1 END,
    CASE WHEN status NOT IN ('pending', 'queued') THEN %(host_a)s + i %% 2 END,
    CASE WHEN i %% 10 = 0 THEN %(host_a)s END,
    CASE WHEN status IN ('completed', 'failed', 'running') THEN md5(i::text) ELSE '' END,
    CASE WHEN status = 'completed' THEN 0 WHEN status = 'failed' THEN 1 END,
    CASE WHEN status IN ('completed', 'failed', 'running') THEN created END,
    CASE WHEN status IN ('completed', 'failed', 'cancelled') THEN created + interval '1 minute'
    END,
    CASE WHEN status IN ('completed', 'failed')
         THEN repeat('log line of the job ' || i || E'\\n', 100) ELSE '' END,
    '',
    ''
FROM g
"""


def fill(rows: int) -> None:
    from django.db import connection

    from django_container_celery.models import ContainerJob, ExecutorHost

    host_a = ExecutorHost.objects.create(name="bench-a", max_concurrent_jobs=50)
    ExecutorHost.objects.create(name="bench-b", max_concurrent_jobs=50)
    table = connection.ops.quote_name(ContainerJob._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(FILL_SQL.format(table=table), {"rows": rows, "host_a": host_a.pk})
    with connection.cursor() as cursor:
        # As autovacuum leaves a long-lived table: statistics fresh, visibility map set.
        cursor.execute(f"VACUUM ANALYZE {table}")


def install_urls() -> tuple[str, str]:
    """The app's admin under /admin/, the baseline copy of it under /baseline/."""
    from django.contrib import admin
    from django.core.paginator import Paginator
    from django.db.models import Count, Q
    from django.test.utils import override_settings
    from django.urls import path

    from django_container_celery import states
    from django_container_celery.admin import ContainerJobAdmin, ExecutorHostAdmin
    from django_container_celery.models import ContainerJob, ExecutorHost

    class BaselineJobAdmin(ContainerJobAdmin):
        paginator = Paginator
        show_full_result_count = True

    class BaselineHostAdmin(ExecutorHostAdmin):
        def get_queryset(self, request: Any) -> Any:
            # The straightforward annotation: a Count over the join with every job.
            return ExecutorHost.objects.annotate(
                active_jobs=Count(
                    "assigned_jobs",
                    filter=Q(assigned_jobs__status__in=sorted(states.ACTIVE)),
                )
            )

    baseline = admin.AdminSite(name="baseline")
    baseline.register(ContainerJob, BaselineJobAdmin)
    baseline.register(ExecutorHost, BaselineHostAdmin)
    module = types.ModuleType("bench_admin_urls")
    module.urlpatterns = [  # type: ignore[attr-defined]
        path("admin/", admin.site.urls),
        path("baseline/", baseline.urls),
    ]
    sys.modules[module.__name__] = module
    override_settings(ROOT_URLCONF=module.__name__).enable()
    app = "django_container_celery"
    return f"/admin/{app}/", f"/baseline/{app}/"


PLAN_NODE = re.compile(r"(Seq Scan|Index Only Scan|Index Scan|Bitmap Index Scan)(?: using (\w+))?")


def plan_of(sql: str, params: Any = None) -> str:
    """The scan nodes of a query's plan, e.g. ``Index Scan using dcc_created_idx``."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        lines = [row[0] for row in cursor.fetchall()]
    nodes = []
    for line in lines:
        match = PLAN_NODE.search(line)
        if match:
            nodes.append(" ".join(filter(None, [match.group(1), match.group(2)])).strip())
    return "+".join(dict.fromkeys(nodes)).replace(" ", "_") or "none"


@dataclasses.dataclass
class Load:
    queries: list[dict[str, Any]]
    wall_ms: list[float]
    sql_ms: list[float]

    def emit(self, prefix: str) -> None:
        emit(f"{prefix}_queries", len(self.queries))
        emit(f"{prefix}_p50_ms", statistics.median(self.wall_ms))
        emit(f"{prefix}_max_ms", max(self.wall_ms))
        emit(f"{prefix}_sql_p50_ms", statistics.median(self.sql_ms))


def measure(client: Any, url: str) -> Load:
    """Load ``url`` LOADS times (after one warm-up): wall time and time spent in SQL.

    Page rendering costs the same for the app and the baseline and varies with the load
    of the machine; the SQL time isolates what the two admins do differently.
    """
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(url)  # warm the template and plan caches
    wall, sql = [], []
    queries: list[dict[str, Any]] = []
    for _ in range(LOADS):
        with CaptureQueriesContext(connection) as captured:
            start = time.perf_counter()
            response = client.get(url)
            wall.append((time.perf_counter() - start) * 1000)
            # Read inside: the next request's request_started signal empties the log.
            queries = list(captured.captured_queries)
        assert response.status_code == 200, (url, response.status_code)
        sql.append(sum(float(query["time"]) for query in queries) * 1000)
    return Load(queries, wall, sql)


def main() -> None:
    started = time.perf_counter()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ["DATABASE_URL"] = recreate_database()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    import django

    django.setup()

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections
    from django.test import Client
    from django.utils import timezone
    from django.utils.http import urlencode

    from django_container_celery.models import ContainerJob

    try:
        call_command("migrate", verbosity=0)
        fill_start = time.perf_counter()
        fill(ROWS)
        emit("rows", ROWS)
        emit("fill_seconds", time.perf_counter() - fill_start)
        ours, baseline = install_urls()
        user = get_user_model().objects.create_superuser("bench", password="bench")
        client = Client()
        client.force_login(user)
        week_ago = timezone.localtime() - timedelta(days=7)
        pages = {
            "unfiltered": "containerjob/",
            "queue_status_queued": "containerjob/?queue_status=queued",
            "status_failed": "containerjob/?status__exact=failed",
            "search_name": "containerjob/?q=report-1999",
            "search_id": "containerjob/?q="
            + str(ContainerJob.objects.values_list("pk", flat=True)[0]),
            "finished_past_7_days": "containerjob/?"
            + urlencode({"completed_at__gte": week_ago.isoformat()}),
            "dashboard": "containerjob/dashboard/",
            "hosts": "executorhost/",
        }
        for name, page in pages.items():
            load = measure(client, ours + page)
            load.emit(name)
            slowest = max(load.queries, key=lambda q: float(q["time"]))
            emit(f"{name}_slowest_query_plan", plan_of(slowest["sql"]))
            if name == "dashboard":
                continue
            base = measure(client, baseline + page)
            base.emit(f"baseline_{name}")
            ratio = statistics.median(base.wall_ms) / statistics.median(load.wall_ms)
            emit(f"{name}_speedup", ratio)
            sql_ratio = statistics.median(base.sql_ms) / max(statistics.median(load.sql_ms), 0.01)
            emit(f"{name}_sql_speedup", sql_ratio)
    finally:
        connections.close_all()
        drop_database()
    emit("total_seconds", time.perf_counter() - started)


if __name__ == "__main__":
    main()
