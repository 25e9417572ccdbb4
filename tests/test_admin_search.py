"""The job list's search and the dashboard's figures, and the indexes that serve them.

The search must keep Django's admin semantics (every word contained, case-insensitively,
in name, image or command) while PostgreSQL answers it from the trigram indexes of
migration 0006; SQLite, and PostgreSQL without pg_trgm, must still migrate. The
dashboard's counts must each be answerable from an index, whatever the table's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib import admin
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from django_container_celery.admin import ContainerJobAdmin
from django_container_celery.admin.search import TEXT_FIELDS, search_jobs, search_words
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import queue_manager
from django_container_celery.states import Status

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
TABLE = ContainerJob._meta.db_table
TRIGRAM_INDEXES = {
    "dcc_search_name_trgm": "name",
    "dcc_search_image_trgm": "docker_image",
    "dcc_search_command_trgm": "command",
}
on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the trigram indexes exist on PostgreSQL only"
)


def make_job(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    return ContainerJob.objects.create(**fields)


def search_page(client: Client, term: str) -> Any:
    url = reverse("admin:django_container_celery_containerjob_changelist")
    response = client.get(f"{url}?{urlencode({'q': term})}")
    assert response.status_code == 200
    return response


def found(client: Client, term: str) -> set[str]:
    return {job.name for job in search_page(client, term).context["cl"].result_list}


def explain(sql: str, params: Any = None) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


# -- what the search finds ---------------------------------------------------------------


@pytest.fixture
def jobs() -> None:
    make_job(name="nightly-report", docker_image="registry.local/Report:3")
    make_job(name="thumbnails", command="python manage.py crunch --size 50%")
    make_job(name="backup", docker_image="alpine:3.20", command="sh -c 'tar czf /out db_1'")
    make_job(name="export", command="python export.py dbx1")


def test_search_finds_name_image_and_command_substrings_in_any_case(
    admin_client: Client, jobs: None
) -> None:
    assert found(admin_client, "NIGHTLY") == {"nightly-report"}
    assert found(admin_client, "report:3") == {"nightly-report"}  # the image says Report
    assert found(admin_client, "CRUNCH") == {"thumbnails"}
    assert found(admin_client, "manage.py") == {"thumbnails"}
    assert found(admin_client, "py") == {"thumbnails", "export"}  # shorter than a trigram
    assert found(admin_client, "nothing-like-it") == set()


def test_every_word_must_match_a_field_of_the_same_job(admin_client: Client, jobs: None) -> None:
    assert found(admin_client, "python crunch") == {"thumbnails"}  # command and command
    assert found(admin_client, "thumb crunch") == {"thumbnails"}  # name and command
    assert found(admin_client, "nightly crunch") == set()  # two jobs, one word each
    # A quoted phrase is one word, spaces included.
    assert found(admin_client, '"manage.py crunch"') == {"thumbnails"}
    assert found(admin_client, '"crunch manage.py"') == set()
    assert search_words("a 'b c' \"d\"") == ["a", "b c", "d"]


def test_like_wildcards_in_a_term_are_plain_characters(admin_client: Client, jobs: None) -> None:
    assert found(admin_client, "50%") == {"thumbnails"}
    assert found(admin_client, "db_1") == {"backup"}  # not "dbx1"


def test_the_search_is_djangos_own_over_the_same_fields(admin_client: Client, jobs: None) -> None:
    job_admin = admin.site._registry[ContainerJob]
    assert isinstance(job_admin, ContainerJobAdmin)
    assert tuple(job_admin.search_fields) == TEXT_FIELDS
    request = RequestFactory().get("/")
    terms = ["report", "PY", "python crunch", '"manage.py crunch"', "50%", "db_1", "x y z"]
    for term in terms:
        ours = search_jobs(ContainerJob.objects.all(), term)
        assert ours is not None
        django_own, duplicates = admin.ModelAdmin.get_search_results(
            job_admin, request, ContainerJob.objects.all(), term
        )
        assert not duplicates
        assert set(ours) == set(django_own), term
    assert search_jobs(ContainerJob.objects.all(), "   ") is None  # nothing to search


def test_a_job_id_or_container_name_finds_that_job(admin_client: Client, jobs: None) -> None:
    job = make_job(name="the-one", attempt=2)
    assert found(admin_client, str(job.pk)) == {"the-one"}
    assert found(admin_client, job.container_name) == {"the-one"}
    assert found(admin_client, str(job.pk).upper()) == {"the-one"}


# -- the trigram indexes ------------------------------------------------------------------


@on_postgresql
def test_the_trigram_indexes_exist_on_the_expressions_the_search_writes(
    admin_client: Client,
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [TABLE])
        definitions = dict(cursor.fetchall())
    with CaptureQueriesContext(connection) as captured:
        search_page(admin_client, "nightly")
    listing = [q["sql"] for q in captured.captured_queries if "LIKE" in q["sql"]][-1]
    for index, column in TRIGRAM_INDEXES.items():
        definition = definitions[index]
        assert "USING gin" in definition and "gin_trgm_ops" in definition
        # PostgreSQL shows varchar columns with their cast to text, text columns bare.
        cast = f"({column})::text" if column != "command" else column
        assert f"upper({cast})" in definition, definition
        # ... which is what Django writes for icontains, the search's only lookup.
        assert f'UPPER("{TABLE}"."{column}"::text) LIKE UPPER(' in listing


@pytest.fixture
def many_jobs() -> Iterator[None]:
    """20,000 jobs, as a kept history looks, with the planner's statistics up to date."""
    columns = {
        field.column: field.get_db_prep_save(field.get_default(), connection)
        for field in ContainerJob._meta.concrete_fields
        if field.column not in ("id", "name", "docker_image", "command", "created_at", "updated_at")
    }
    names = ", ".join(connection.ops.quote_name(column) for column in columns)
    values = ", ".join(["%s"] * len(columns))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (id, name, docker_image, command, created_at, updated_at,"
            f" {names}) SELECT gen_random_uuid(), 'job-' || i,"
            " (ARRAY['busybox:latest', 'registry.local/report:3'])[1 + i %% 2],"
            " 'sh -c \"run ' || i || '\"', now() - make_interval(secs => i),"
            f" now() - make_interval(secs => i), {values} FROM generate_series(1, 20000) AS i",
            list(columns.values()),
        )
        # Rows just inserted wait in each GIN index's pending list, which every search
        # must read whole; vacuum moves them into the index proper, as it does in use.
        for index in TRIGRAM_INDEXES:
            cursor.execute("SELECT gin_clean_pending_list(%s::regclass)", [index])
        cursor.execute(f"ANALYZE {TABLE}")
    yield


@on_postgresql
def test_the_planner_serves_a_rare_word_from_the_trigram_indexes(
    admin_client: Client, many_jobs: None
) -> None:
    with CaptureQueriesContext(connection) as captured:
        response = search_page(admin_client, "JOB-12345")
    assert [job.name for job in response.context["cl"].result_list] == ["job-12345"]
    searched = [q["sql"] for q in captured.captured_queries if "LIKE" in q["sql"]]
    assert len(searched) == 2  # the count, then the page
    for sql in searched:
        plan = explain(sql)
        assert "Seq Scan on " + TABLE not in plan, plan
        for index in TRIGRAM_INDEXES:
            assert f"Bitmap Index Scan on {index}" in plan, plan


@on_postgresql
def test_a_common_word_is_listed_along_the_created_at_index(
    admin_client: Client, many_jobs: None
) -> None:
    # Half the jobs match: the page reads the newest rows until it has 100, no sort of
    # 10,000 rows.
    with CaptureQueriesContext(connection) as captured:
        response = search_page(admin_client, "report:3")
    assert len(response.context["cl"].result_list) == 100
    listing = [q["sql"] for q in captured.captured_queries if "LIMIT 100" in q["sql"]]
    plan = explain(listing[-1])
    assert "Index Scan Backward using dcc_created_idx" in plan, plan


# -- migrating where the trigram indexes cannot be built -------------------------------------


def migrate_env(database_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DCC_TEST_DATABASE"}
    env.update(DATABASE_URL=database_url, PYTHONPATH=str(ROOT))
    return env


def migrate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--settings=tests.settings", *args],
        cwd=ROOT,
        env=migrate_env(database_url),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_sqlite_migrates_forwards_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert "0006_search_trigram... OK" in migrate(url).stdout
    assert "Unapplying django_container_celery.0006_search_trigram... OK" in (
        migrate(url, "django_container_celery", "0005").stdout
    )


def server_url(database: str) -> str:
    db = connection.settings_dict
    return (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{database}"
    )


@pytest.fixture
def database_without_create_privilege() -> Iterator[str]:
    """A PostgreSQL database in which its owner may not create extensions."""
    name = f"{connection.settings_dict['NAME']}_notrgm"
    quoted = connection.ops.quote_name(name)
    user = connection.ops.quote_name(connection.settings_dict["USER"])
    # Its own connection: CREATE and DROP DATABASE refuse the test's transaction.
    with psycopg.connect(server_url(connection.settings_dict["NAME"]), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {quoted}")
        # Trusted extensions need CREATE on the database, which its owner may give up.
        conn.execute(f"REVOKE CREATE ON DATABASE {quoted} FROM PUBLIC, {user}")
    yield server_url(name)
    with psycopg.connect(server_url(connection.settings_dict["NAME"]), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")


@on_postgresql
def test_without_pg_trgm_the_migration_says_why_and_goes_on(
    database_without_create_privilege: str,
) -> None:
    done = migrate(database_without_create_privilege)
    assert "0006_search_trigram... OK" in done.stdout
    assert "The job search is not indexed" in done.stderr
    assert "permission denied to create extension" in done.stderr
    with psycopg.connect(database_without_create_privilege) as conn:
        indexes = {
            row[0]
            for row in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = %s", [TABLE]
            ).fetchall()
        }
    assert "dcc_waiting_since_idx" in indexes  # the model's own indexes are there
    assert not indexes & set(TRIGRAM_INDEXES)


# -- the dashboard's figures ---------------------------------------------------------------


def test_queue_stats_figures() -> None:
    now = timezone.now()
    host = ExecutorHost.objects.create(name="h1", max_concurrent_jobs=4)
    make_job(status=Status.QUEUED, queued_at=now - timedelta(hours=3))
    make_job(status=Status.RETRYING, queued_at=now - timedelta(hours=1))
    make_job(
        status=Status.QUEUED,
        queued_at=now - timedelta(hours=5),
        scheduled_for=now + timedelta(days=1),
    )
    make_job(status=Status.QUEUED, queued_at=now, scheduled_for=now - timedelta(minutes=1))
    make_job(status=Status.RUNNING, assigned_host=host, launched_at=now)
    make_job(status=Status.LAUNCHING)
    make_job(status=Status.FAILED, queued_at=now)  # never launched
    make_job(status=Status.FAILED, launched_at=now)
    make_job(status=Status.COMPLETED, launched_at=now)
    stats = queue_manager.get_queue_stats()
    assert {key: stats[key] for key in ("queue_depth", "ready_now", "scheduled_future")} == {
        "queue_depth": 4,
        "ready_now": 3,
        "scheduled_future": 1,
    }
    assert (stats["running"], stats["launch_failed"]) == (2, 1)
    assert stats["oldest_waiting_since"] == now - timedelta(hours=5)
    assert stats["by_status"] == {
        "pending": 0,
        "queued": 3,
        "launching": 1,
        "running": 1,
        "retrying": 1,
        "completed": 1,
        "failed": 2,
        "cancelled": 0,
    }
    (row,) = stats["hosts"]
    assert (row["name"], row["used_slots"], row["slots"]) == ("h1", 1, 4)
    assert queue_manager.get_queue_stats(rooms=[])["hosts"] == []


@on_postgresql
def test_every_job_count_of_the_dashboard_can_be_read_from_an_index(
    admin_client: Client,
) -> None:
    """Planned with sequential scans priced out: any count still reading the table is
    one that no index can answer. The hosts' room (placement) is left out: it is read
    with a join that filters after aggregating."""
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse("admin:django_container_celery_containerjob_dashboard"))
    assert response.status_code == 200
    counted = [
        q["sql"]
        for q in captured.captured_queries
        if f'FROM "{TABLE}"' in q["sql"] and "executorhost" not in q["sql"]
    ]
    # By status, the waiting jobs, launch failures, failures lately, the oldest waiting.
    assert len(counted) >= 5
    with connection.cursor() as cursor:
        # Until the test's transaction ends. A count whose conditions sit only in FILTER
        # clauses (one pass over the table) has no index path, and keeps its Seq Scan.
        cursor.execute("SET LOCAL enable_seqscan = off")
    for sql in counted:
        plan = explain(sql)
        assert "Seq Scan" not in plan, plan
