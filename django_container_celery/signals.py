"""Signals the engine sends. The engine imports nothing from Celery; the Celery layer
(``results.py``) listens here to store each job's result under its task id."""

from __future__ import annotations

from django.dispatch import Signal

# Sent with ``job`` (the instance as just written) whenever an attempt has ended and the
# row says how: ``completed``, ``failed``, ``cancelled`` or ``retrying``. Whoever ended it
# sends it: the watcher, the queue command, a launch that failed, an operator's cancel.
attempt_ended = Signal()
