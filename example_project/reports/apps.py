from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _sqlite_wal(sender: object, connection: object, **kwargs: object) -> None:
    # With write-ahead logging, readers (the admin, the demo's progress display) never
    # block the workers' writes; the mode is stored in the database file.
    if getattr(connection, "vendor", "") == "sqlite":
        with connection.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")


class ReportsConfig(AppConfig):
    name = "reports"
    verbose_name = "Reports (example container tasks)"

    def ready(self) -> None:
        connection_created.connect(_sqlite_wal, dispatch_uid="reports.sqlite_wal")
