import django
from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _sqlite_wal(sender: object, connection: object, **kwargs: object) -> None:
    # With write-ahead logging, readers (the admin, the demo's progress display) never
    # block the workers' writes; the mode is stored in the database file.
    if getattr(connection, "vendor", "") == "sqlite":
        with connection.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
        if django.VERSION < (5, 1):
            # Before 5.1 there is no OPTIONS["transaction_mode"] (see settings.py): begin
            # every transaction IMMEDIATE by hand, or one that reads, then writes fails at
            # once with "database is locked" while another process writes.
            def begin_immediate() -> None:
                connection.cursor().execute("BEGIN IMMEDIATE")  # type: ignore[attr-defined]

            connection._start_transaction_under_autocommit = begin_immediate  # type: ignore[attr-defined]


class ReportsConfig(AppConfig):
    name = "reports"
    verbose_name = "Reports (example container tasks)"

    def ready(self) -> None:
        connection_created.connect(_sqlite_wal, dispatch_uid="reports.sqlite_wal")
