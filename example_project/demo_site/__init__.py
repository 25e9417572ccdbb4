# Importing the Celery app here makes it the current app as soon as Django loads, so
# @shared_task and @container_task bind to it in every process (web, worker, beat).
from .celery import app as celery_app

__all__ = ["celery_app"]
