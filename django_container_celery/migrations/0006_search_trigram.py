"""Indexes for the admin's search at hundreds of thousands of jobs.

On PostgreSQL with the ``pg_trgm`` extension, three GIN trigram indexes serve the job
list's search, a case-insensitive "contains" on name, image and command. They are not in
the model's state: they exist only where the database supports them, so
``makemigrations`` knows nothing of them and other databases get none. Where the
extension cannot be had, the migration logs why and goes on: the search still works, by
reading the table.

The migration is not atomic so that the trigram indexes are built ``CONCURRENTLY`` on a
live table: workers keep writing jobs while an index that can take minutes on a large
table is built (a plain ``CREATE INDEX`` would block every claim and status change until
it finishes). It holds nothing else, so that a build interrupted half way (a lock
timeout: ``CONCURRENTLY`` waits for every older transaction) can simply be run again;
the dashboard's B-tree indexes are in 0005, which is atomic.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import DatabaseError, migrations, transaction

logger = logging.getLogger("django_container_celery.migrations")

# (index name, indexed expression). Each expression is, character for character in the
# planner's eyes, the left side Django writes on PostgreSQL for ``<field>__icontains``
# (``UPPER("col"::text) LIKE UPPER(%s)``, Django 4.2 to 5.2): an index on any other
# expression (``LOWER``, ``ILIKE``'s bare column) would never be chosen for it.
TRIGRAM_INDEXES = (
    ("dcc_search_name_trgm", 'UPPER("name"::text)'),
    ("dcc_search_image_trgm", 'UPPER("docker_image"::text)'),
    ("dcc_search_command_trgm", 'UPPER("command"::text)'),
)

HOW_TO_ADD_LATER = (
    "once it is available (CREATE EXTENSION pg_trgm; as the database's owner or a "
    "superuser), add the indexes with `manage.py migrate django_container_celery 0005` "
    "then `manage.py migrate`"
)


def _trigram_schema(schema_editor: Any) -> str | None:
    """The schema pg_trgm is installed in, creating it if needed; None when it cannot be
    had (the reason is logged)."""
    find = (
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_trgm'"
    )
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(find)
        row = cursor.fetchone()
        if row is not None:
            return str(row[0])
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
        if cursor.fetchone() is None:
            logger.warning(
                "The job search is not indexed: the PostgreSQL server has no pg_trgm "
                "extension (Debian and Ubuntu ship it in postgresql-NN, elsewhere often "
                "in postgresql-contrib); %s.",
                HOW_TO_ADD_LATER,
            )
            return None
        try:
            # Trusted since PostgreSQL 13: the database's owner may create it. Inside its
            # own transaction (a savepoint if one is open) so a refusal leaves nothing
            # half done.
            with transaction.atomic(using=connection.alias):
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except DatabaseError as error:
            logger.warning(
                "The job search is not indexed: creating the pg_trgm extension was "
                "refused (%s); %s.",
                " ".join(str(error).split()),
                HOW_TO_ADD_LATER,
            )
            return None
        cursor.execute(find)
        row = cursor.fetchone()
    return None if row is None else str(row[0])


def add_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    schema = _trigram_schema(schema_editor)
    if schema is None:
        return
    job = apps.get_model("django_container_celery", "ContainerJob")
    table = schema_editor.quote_name(job._meta.db_table)
    # Qualified: the extension may live in a schema that is not on the search path.
    opclass = f"{schema_editor.quote_name(schema)}.gin_trgm_ops"
    # CONCURRENTLY is refused inside a transaction, as when this runs within an atomic
    # block opened by the caller; the index is then built the plain way.
    concurrently = "" if connection.in_atomic_block else " CONCURRENTLY"
    with connection.cursor() as cursor:
        for name, expression in TRIGRAM_INDEXES:
            index = schema_editor.quote_name(name)
            # An interrupted concurrent build leaves an invalid index behind, which
            # IF NOT EXISTS would keep for good: drop it and build again.
            cursor.execute(
                "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [index]
            )
            row = cursor.fetchone()
            if row is not None and row[0]:
                cursor.execute(f"DROP INDEX{concurrently} IF EXISTS {index}")
            cursor.execute(
                f"CREATE INDEX{concurrently} IF NOT EXISTS {index} ON {table} "
                f"USING gin (({expression}) {opclass})"
            )


def remove_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    # The extension stays: other tables may use it, and dropping it needs its owner.
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    concurrently = "" if connection.in_atomic_block else " CONCURRENTLY"
    with connection.cursor() as cursor:
        for name, _expression in TRIGRAM_INDEXES:
            cursor.execute(f"DROP INDEX{concurrently} IF EXISTS {schema_editor.quote_name(name)}")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("django_container_celery", "0005_job_attempts"),
    ]

    operations = [
        migrations.RunPython(add_trigram_indexes, remove_trigram_indexes, atomic=False),
    ]
