"""Queue and run Docker container jobs from Django, with Celery.

``container_task`` is imported lazily so that importing the package (for example from
settings) does not import Django models or Celery before they are ready.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["container_task"]


def __getattr__(name: str) -> Any:
    if name == "container_task":
        from .api import container_task

        return container_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
