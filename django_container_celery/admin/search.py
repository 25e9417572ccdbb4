"""The job list's search box: a job id or container name finds that job exactly; other
text is matched against name, image and command."""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.db.models import QuerySet

_JOB_ID_RE = re.compile(
    r"(?:dcc-)?([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12})(?:-a\d+)?"
)


def parse_job_id(term: str) -> uuid.UUID | None:
    """A job id from a search term: the id itself, or a container name ``dcc-<id>-a<n>``."""
    match = _JOB_ID_RE.fullmatch(term.strip())
    if match is None:
        return None
    try:
        return uuid.UUID(match.group(1))
    except ValueError:
        return None


def search_jobs(queryset: QuerySet[Any], term: str) -> QuerySet[Any] | None:
    """The jobs a search term finds, or None to let the admin's own search run."""
    job_id = parse_job_id(term)
    if job_id is not None:
        return queryset.filter(pk=job_id)
    return None
