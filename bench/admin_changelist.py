"""How fast the container-job admin answers with 200,000 jobs in the table.

Creates its own PostgreSQL database (dropped at the end), fills it with jobs of mixed
status, priority and host, then loads admin pages through Django's test client, each
against a baseline loaded in the same run:

* the changelist unfiltered and filtered, and the host list: against the same admin with
  Django's default paginator and ``show_full_result_count=True`` (``baseline_*``), on a
  second admin site;
* text searches (a rare word, a name prefix, a common image, two words, a rare word with
  one found in every job, a word found in every job): against the same page before the
  trigram indexes of migration 0006 exist (``baseline_search_*``), i.e. a read of the
  whole table; ``*_rows`` is how many jobs each finds. The search by job id, which the
  trigram indexes do not serve, is compared like the changelist;
* the dashboard: against the same page with its job counts taken as first written, one
  aggregate over the whole table, and the hosts' room read a second time
  (``baseline_dashboard_*``).

Prints ``name=value`` lines; ``*_sql_p50_ms`` is the time spent in SQL, which isolates
what the two sides do differently from the rendering, which varies with the machine's load.

Environment (optional): BENCH_PG_URL, the server and credentials to use (default
postgres://dcc:dcc@127.0.0.1:5432/dcc; the database name is replaced); BENCH_ROWS (200000);
BENCH_LOADS, timed loads per page (5).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import statistics
import sys
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock
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
FILL_ROWS = """
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
"""

# Column -> SQL expression over the row ``g`` above. Every other column of the model gets
# its field's default (see ``fill``), so a field added later needs no change here.
FILL_COLUMNS = {
    "id": "gen_random_uuid()",
    "name": "(ARRAY['report', 'thumbnail', 'export', 'reindex', 'backup'])[1 + i %% 5] || '-' || i",
    "docker_image": "(ARRAY['busybox:latest', 'registry.local/report:3',"
    " 'registry.local/search:7'])[1 + i %% 3]",
    "command": "'sh -c \"run ' || i || '\"'",
    "environment": "jsonb_build_object('MODE', 'batch', 'API_TOKEN', 'tok-' || i)",
    "created_at": "created",
    "updated_at": "created",
    "status": "status",
    "priority": "(ARRAY[20, 50, 50, 50, 80])[1 + i %% 5]",
    "queued_at": "CASE WHEN status <> 'pending' THEN created END",
    "scheduled_for": """CASE
        WHEN status = 'retrying' THEN now() + interval '5 minutes'
        WHEN status = 'queued' AND i %% 4 = 0 THEN now() + interval '1 hour'
    END""",
    "launched_at": """CASE WHEN status IN ('completed', 'running', 'cancelled')
        OR (status = 'failed' AND i %% 2 = 0) THEN created + interval '2 seconds' END""",
    "retry_count": "CASE WHEN status IN ('failed', 'retrying') THEN 1 ELSE 0 END",
    "last_error": "CASE WHEN status = 'failed' THEN 'exit code 1' ELSE '' END",
    "last_error_at": "CASE WHEN status = 'failed' THEN created + interval '1 minute' END",
    "claimed_by": "CASE WHEN status IN ('running', 'launching') THEN 'bench-worker' ELSE '' END",
    "attempt": "CASE WHEN status IN ('pending', 'queued') THEN 0 ELSE 1 END",
    "assigned_host_id": "CASE WHEN status NOT IN ('pending', 'queued')"
    " THEN %(host_a)s + i %% 2 END",
    "docker_host_id": "CASE WHEN i %% 10 = 0 THEN %(host_a)s END",
    "execution_id": "CASE WHEN status IN ('completed', 'failed', 'running')"
    " THEN md5(i::text) ELSE '' END",
    "exit_code": "CASE WHEN status = 'completed' THEN 0 WHEN status = 'failed' THEN 1 END",
    "started_at": "CASE WHEN status IN ('completed', 'failed', 'running') THEN created END",
    "completed_at": "CASE WHEN status IN ('completed', 'failed', 'cancelled')"
    " THEN created + interval '1 minute' END",
    "stdout_log": "CASE WHEN status IN ('completed', 'failed')"
    " THEN repeat('log line of the job ' || i || E'\\n', 100) ELSE '' END",
}


def fill(rows: int) -> None:
    from django.db import connection

    from django_container_celery.models import ContainerJob, ExecutorHost

    host_a = ExecutorHost.objects.create(name="bench-a", max_concurrent_jobs=50)
    ExecutorHost.objects.create(name="bench-b", max_concurrent_jobs=50)
    table = connection.ops.quote_name(ContainerJob._meta.db_table)
    params: dict[str, Any] = {"rows": rows, "host_a": host_a.pk}
    columns = dict(FILL_COLUMNS)
    for field in ContainerJob._meta.concrete_fields:
        if field.column not in columns:
            # The field's default ("" for blank text, None when nullable), adapted as
            # Django saves it.
            key = f"default_{field.column}"
            params[key] = field.get_db_prep_save(field.get_default(), connection)
            columns[field.column] = f"%({key})s"
    names = ", ".join(connection.ops.quote_name(column) for column in columns)
    sql = f"INSERT INTO {table} ({names}) SELECT {', '.join(columns.values())} FROM g"
    with connection.cursor() as cursor:
        cursor.execute(f"WITH g AS ({FILL_ROWS}) {sql}", params)
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


def trigram_indexes(build: bool) -> None:
    """Build (or drop) the search's trigram indexes as migration 0006 does."""
    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("django_container_celery.migrations.0006_search_trigram")
    step = migration.add_trigram_indexes if build else migration.remove_trigram_indexes
    with connection.schema_editor(atomic=False) as editor:
        step(apps, editor)
    if build:
        from django_container_celery.models import ContainerJob

        with connection.cursor() as cursor:
            # Statistics on the indexed expressions: the planner's estimate of how many
            # jobs a word finds, which decides between the index and the created_at order.
            cursor.execute(f"ANALYZE {connection.ops.quote_name(ContainerJob._meta.db_table)}")


def one_pass_stats(rooms: Any = None) -> dict[str, Any]:
    """``get_queue_stats`` as first written: every figure in one aggregate over the whole
    table, and the hosts' room read again (the dashboard had read it already)."""
    from django.db.models import Count, Min, Q
    from django.utils import timezone

    from django_container_celery import placement, states
    from django_container_celery.models import ContainerJob
    from django_container_celery.states import Status

    now = timezone.now()
    due = Q(scheduled_for__isnull=True) | Q(scheduled_for__lte=now)
    waiting = Q(status__in=states.WAITING)
    counts = ContainerJob.objects.aggregate(
        ready_now=Count("pk", filter=waiting & due),
        scheduled_future=Count("pk", filter=waiting & Q(scheduled_for__gt=now)),
        running=Count("pk", filter=Q(status__in=states.ACTIVE)),
        launch_failed=Count("pk", filter=Q(status=Status.FAILED, launched_at__isnull=True)),
        oldest_waiting_since=Min("queued_at", filter=waiting),
        **{f"status_{s.value}": Count("pk", filter=Q(status=s.value)) for s in Status},
    )
    return {
        "queue_depth": counts["ready_now"] + counts["scheduled_future"],
        "ready_now": counts["ready_now"],
        "scheduled_future": counts["scheduled_future"],
        "running": counts["running"],
        "launch_failed": counts["launch_failed"],
        "by_status": {s.value: counts[f"status_{s.value}"] for s in Status},
        "oldest_waiting_since": counts["oldest_waiting_since"],
        "hosts": [{"name": room.name} for room in placement.host_rooms()],
    }


def emit_against(name: str, load: Load, base: Load) -> None:
    base.emit(f"baseline_{name}")
    emit(f"{name}_speedup", statistics.median(base.wall_ms) / statistics.median(load.wall_ms))
    sql_ratio = statistics.median(base.sql_ms) / max(statistics.median(load.sql_ms), 0.01)
    emit(f"{name}_sql_speedup", sql_ratio)


def emit_load(name: str, load: Load) -> None:
    load.emit(name)
    slowest = max(load.queries, key=lambda q: float(q["time"]))
    emit(f"{name}_slowest_sql_ms", float(slowest["time"]) * 1000)
    emit(f"{name}_slowest_query_plan", plan_of(slowest["sql"]))


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

    from django_container_celery.admin.search import search_jobs
    from django_container_celery.models import ContainerJob
    from django_container_celery.queue import queue_manager

    try:
        call_command("migrate", verbosity=0)
        # Filled without the trigram indexes, so the searches' baseline can be read first.
        trigram_indexes(build=False)
        fill_start = time.perf_counter()
        fill(ROWS)
        emit("rows", ROWS)
        emit("fill_seconds", time.perf_counter() - fill_start)
        ours, baseline = install_urls()
        user = get_user_model().objects.create_superuser("bench", password="bench")
        client = Client()
        client.force_login(user)
        week_ago = timezone.localtime() - timedelta(days=7)
        searches = {
            "search_rare": "thumbnail-123451",
            "search_name": "report-1999",
            "search_image": "search:7",
            "search_two_words": "report busybox",
            "search_rare_and_everywhere": "run 4242",
            "search_everywhere": "run",
        }
        unindexed = {}
        for name, term in searches.items():
            found = search_jobs(ContainerJob.objects.all(), term)
            emit(f"{name}_rows", found.count() if found is not None else ROWS)
            unindexed[name] = measure(client, ours + "containerjob/?" + urlencode({"q": term}))
        build_start = time.perf_counter()
        trigram_indexes(build=True)
        emit("trigram_indexes_build_seconds", time.perf_counter() - build_start)

        pages = {
            "unfiltered": "containerjob/",
            "queue_status_queued": "containerjob/?queue_status=queued",
            "status_failed": "containerjob/?status__exact=failed",
            "finished_past_7_days": "containerjob/?"
            + urlencode({"completed_at__gte": week_ago.isoformat()}),
            # The exact-id path reads the primary key with or without the trigram indexes.
            "search_id": "containerjob/?q="
            + str(ContainerJob.objects.values_list("pk", flat=True)[0]),
            "hosts": "executorhost/",
        }
        for name, page in pages.items():
            load = measure(client, ours + page)
            emit_load(name, load)
            emit_against(name, load, measure(client, baseline + page))
        for name, term in searches.items():
            load = measure(client, ours + "containerjob/?" + urlencode({"q": term}))
            emit_load(name, load)
            emit_against(name, load, unindexed[name])

        dashboard = ours + "containerjob/dashboard/"
        load = measure(client, dashboard)
        emit_load("dashboard", load)
        with mock.patch.object(queue_manager, "get_queue_stats", one_pass_stats):
            emit_against("dashboard", load, measure(client, dashboard))
    finally:
        connections.close_all()
        drop_database()
    emit("total_seconds", time.perf_counter() - started)


if __name__ == "__main__":
    main()
