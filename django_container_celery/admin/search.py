"""The job list's search box: a job id or container name finds that job exactly; other
text is matched against name, image and command.

On PostgreSQL the text search is served by the trigram indexes of migration 0006, one per
field, built on the very expression Django writes for ``icontains`` there:
``UPPER("col"::text) LIKE UPPER('%word%')``. The planner ORs the three index scans into
one bitmap, so a rare word reads a few index pages instead of every row; a word found in
many rows is listed newest first along the ``created_at`` index, stopping at a page (its
exact count, which the paginator takes, still visits every row found).
Words of fewer than three characters hold no trigram and are matched by reading the
table, as everywhere without the indexes (SQLite, or PostgreSQL without ``pg_trgm``).
"""

from __future__ import annotations

import functools
import operator
import re
import uuid
from typing import Any

from django.db.models import Q, QuerySet
from django.utils.text import smart_split, unescape_string_literal

_JOB_ID_RE = re.compile(
    r"(?:dcc-)?([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12})(?:-a\d+)?"
)

# The fields the text search reads, each with its own trigram index (migration 0006);
# the admin's ``search_fields`` names the same ones.
TEXT_FIELDS = ("name", "docker_image", "command")


def parse_job_id(term: str) -> uuid.UUID | None:
    """A job id from a search term: the id itself, or a container name ``dcc-<id>-a<n>``."""
    match = _JOB_ID_RE.fullmatch(term.strip())
    if match is None:
        return None
    try:
        return uuid.UUID(match.group(1))
    except ValueError:
        return None


def search_words(term: str) -> list[str]:
    """The words of a search term as Django's admin splits them: on spaces, a quoted
    phrase kept whole (without its quotes)."""
    words = []
    for bit in smart_split(term):
        if bit.startswith(('"', "'")) and bit[0] == bit[-1]:
            bit = unescape_string_literal(bit)
        words.append(bit)
    return words


def text_search_q(term: str) -> Q | None:
    """Every word contained, case-insensitively, in one of the fields: the admin's own
    search over ``TEXT_FIELDS``. None for a term with no words."""
    words = search_words(term)
    if not words:
        return None
    # ``icontains`` and nothing else: it is the expression the indexes are built on.
    per_word = [
        functools.reduce(
            operator.or_, (Q(**{f"{field}__icontains": word}) for field in TEXT_FIELDS)
        )
        for word in words
    ]
    return functools.reduce(operator.and_, per_word)


def search_jobs(queryset: QuerySet[Any], term: str) -> QuerySet[Any] | None:
    """The jobs a search term finds, or None to let the admin's own search run."""
    job_id = parse_job_id(term)
    if job_id is not None:
        return queryset.filter(pk=job_id)
    condition = text_search_q(term)
    if condition is None:
        return None
    return queryset.filter(condition)
