"""Job logs in the admin: the stored tails, masked like every other output of the app."""

from __future__ import annotations

from ..masking import mask_text
from ..models import ContainerJob

LOG_STREAMS = {"stdout": "stdout_log", "stderr": "stderr_log"}
LOG_PREVIEW_CHARS = 2000
# The admin's name for the masking every other output of the app uses too.
redact = mask_text


def log_text(job: ContainerJob, stream: str) -> str:
    return mask_text(getattr(job, LOG_STREAMS[stream]) or "", job.environment)


def log_preview(job: ContainerJob, stream: str) -> tuple[str, bool]:
    """The tail of a log for the change page, and whether it was cut."""
    text = log_text(job, stream)
    if len(text) <= LOG_PREVIEW_CHARS:
        return text, False
    return text[-LOG_PREVIEW_CHARS:], True
