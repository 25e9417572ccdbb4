"""The id of this installation, which every job container it starts carries as a label.

Several installations (each with its own database) may share one Docker daemon. Each one
sweeps and cleans up only the containers labelled with its own id. The id is the oldest
row of the ``Installation`` table. The migration creates that row, and
:func:`installation_id` creates it again if the table is empty.

The id is cached per process and per database; see :func:`installation_id` for when the
cache is refreshed.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from .models import Installation

__all__ = ["forget", "installation_id"]

# (vendor, host, port, database name) -> id. The database name is in the key because a test
# run switches the same alias over to its test database.
_cache: dict[tuple[str, str, str, str], str] = {}


def installation_id(using: str = DEFAULT_DB_ALIAS) -> str:
    """This installation's id, read from its database (and created there if missing).

    The id is read once per process and database and then kept. Reading it again before
    every launch and sweep would cost a query each time, and only helps if someone deletes
    the row while processes are running. When that happens, each process keeps its cached
    id until it restarts, and cleanup leaves alone the containers labelled with an id it
    does not know. The one routine deletion is ``flush`` (between transactional tests). It
    sends ``post_migrate``, and :func:`restore_after_flush` then puts the same id back, so
    the processes that cached it stay in agreement.
    """
    key = _key(using)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    found = _oldest(using) or _create(using)
    # Cached only once committed: inside a transaction that is later rolled back (a test's),
    # a row created here would vanish while the cache still named it.
    transaction.on_commit(lambda: _cache.__setitem__(key, found), using=using)
    return found


def forget() -> None:
    """Drop the cached ids so that the next call reads the database again (for tests)."""
    _cache.clear()


def restore_after_flush(using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    """A ``post_migrate`` receiver: after ``flush`` has emptied the table, put back the id
    this process has cached; if the table holds another id, forget ours."""
    key = _key(using)
    cached = _cache.get(key)
    if cached is None:
        return
    # A migration back past the table's creation also ends in post_migrate.
    table_exists = Installation._meta.db_table in connections[using].introspection.table_names()
    if not table_exists or _create(using, preferred=cached) != cached:
        _cache.pop(key, None)


def _key(using: str) -> tuple[str, str, str, str]:
    connection = connections[using]
    settings = connection.settings_dict
    host, port = str(settings.get("HOST") or ""), str(settings.get("PORT") or "")
    return (connection.vendor, host, port, str(settings["NAME"]))


def _oldest(using: str) -> str | None:
    rows = Installation.objects.using(using).order_by("created_at", "id")
    pk = rows.values_list("pk", flat=True).first()
    return None if pk is None else str(pk)


def _create(using: str, preferred: str | None = None) -> str:
    """The oldest id, after inserting one (``preferred`` or a new one) if there is none.

    The table is locked before the check. Two processes that find it empty at the same time
    therefore insert one row, not two, and both return that row's id.
    """
    with transaction.atomic(using=using):
        _lock_table(using)
        found = _oldest(using)
        if found is not None:
            return found
        fields = {"id": preferred} if preferred else {}
        return str(Installation.objects.using(using).create(**fields).pk)


def _lock_table(using: str) -> None:
    connection = connections[using]
    table = connection.ops.quote_name(Installation._meta.db_table)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # This mode conflicts with itself and with inserts, but not with plain reads.
            cursor.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
        else:
            # On SQLite, an UPDATE takes the database's write lock even when it matches no
            # row, so the creators queue up just as they do behind the lock above.
            cursor.execute(f"UPDATE {table} SET id = id WHERE 1 = 0")
