"""The watcher inside Celery workers: started in each worker's main process when the
worker is ready, stopped when the worker has shut down.

This is driver code: the watcher itself (``watching.py``) is engine code and knows
nothing of Celery. ``CONTAINER_CELERY["WATCHER"] = False`` turns it off.

A worker whose ``CONTAINER_CELERY`` fails the app's system checks does not start at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import signals
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from . import results
from .conf import app_settings
from .signals import attempt_ended
from .watching import Watcher

logger = logging.getLogger(__name__)

_watcher: Watcher | None = None


class NextJobDispatcher:
    """Sends the next run messages soon after a job ends, off the watcher's thread.

    A finished job frees a slot; waiting for beat's next dispatch would leave it idle for
    up to ``DISPATCH_INTERVAL``. Requests that arrive together are served by one dispatch,
    and a slow broker delays only this thread, never the recording of exits.
    """

    def __init__(self) -> None:
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcc-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self, sender: Any = None, **kwargs: Any) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.set()
        self._thread.join(5)

    def _run(self) -> None:
        from .tasks import dispatch_ready_jobs

        try:
            while True:
                self._wanted.wait()
                if self._stopping.is_set():
                    return
                self._wanted.clear()
                try:
                    dispatch_ready_jobs.run()
                except Exception:  # the broker or the database is down: beat catches up
                    logger.warning("dispatch after a job ended failed", exc_info=True)
                    connection.close()
        finally:
            connection.close()


_dispatcher: NextJobDispatcher | None = None


def current_watcher() -> Watcher | None:
    """The watcher of this worker process, if one runs."""
    return _watcher


def check_settings() -> None:
    """Raise ``ImproperlyConfigured`` listing the errors of this app's system checks
    (``CONTAINER_CELERY``); log its warnings. Silenced checks are left out, as by
    ``manage.py check``."""
    from .checks import TAG

    messages = [m for m in run_checks(tags=[TAG]) if not m.is_silenced()]
    for message in messages:
        if not message.is_serious():
            logger.warning("(%s) %s %s", message.id, message.msg, message.hint or "")
    errors = [m for m in messages if m.is_serious()]
    if errors:
        lines = [f"({m.id}) {m.msg}" + (f"\n    HINT: {m.hint}" if m.hint else "") for m in errors]
        raise ImproperlyConfigured(
            f"CONTAINER_CELERY has {len(errors)} error(s):\n" + "\n".join(lines)
        )


@signals.worker_init.connect(dispatch_uid="django_container_celery.worker.check")
def refuse_bad_settings(sender: Any = None, **kwargs: Any) -> None:
    try:
        check_settings()
    except ImproperlyConfigured as exc:
        # Celery catches an Exception raised by a signal receiver, logs it (through logging
        # not set up yet at worker_init, so nowhere) and starts the worker anyway.
        # SystemExit is no Exception: the worker process ends with status 1 and Python
        # prints the message on stderr.
        raise SystemExit(f"Celery worker not started: ImproperlyConfigured: {exc}") from exc


@signals.worker_ready.connect(dispatch_uid="django_container_celery.worker.start")
def start_watcher(sender: Any = None, **kwargs: Any) -> None:
    global _watcher, _dispatcher
    if not app_settings.WATCHER or _watcher is not None:
        return
    hostname = str(getattr(sender, "hostname", "") or socket.gethostname())
    results.event_hostname = hostname
    _dispatcher = NextJobDispatcher()
    _dispatcher.start()
    attempt_ended.connect(_dispatcher.poke, dispatch_uid="django_container_celery.worker.next")
    _watcher = Watcher(watcher_id=f"watcher@{hostname}:{os.getpid()}")
    _watcher.start()


@signals.worker_shutdown.connect(dispatch_uid="django_container_celery.worker.stop")
def stop_watcher(**kwargs: Any) -> None:
    # Sent once the pool has stopped: canvas steps that waited for their jobs are done,
    # and the watcher kept finishing jobs for them until now.
    global _watcher, _dispatcher
    watcher, _watcher = _watcher, None
    dispatcher, _dispatcher = _dispatcher, None
    if watcher is not None:
        watcher.stop(timeout=5)
    if dispatcher is not None:
        attempt_ended.disconnect(dispatch_uid="django_container_celery.worker.next")
        dispatcher.stop()
