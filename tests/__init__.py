# As in a project's own package: importing the Celery app when Django loads makes it the
# current app in every process (test runner, workers, beat and the queue command), so
# results stored by whoever finishes a job reach the configured result backend.
from .celery_app import app as celery_app

__all__ = ["celery_app"]
