"""Counting and loading the job list without reading the whole table."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property

from .outcome import ERROR_HEAD

# Never loaded for the list, which shows none of them whole: each log alone may hold
# LOG_MAX_BYTES, and a hundred rows of logs would dwarf the page.
LIST_DEFERRED = ("stdout_log", "stderr_log", "description", "last_error", "command")


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered large table from the planner's statistics, not a scan.

    ``COUNT(*)`` over hundreds of thousands of rows costs a full scan on PostgreSQL, on
    every page load, for a number an operator reads as "about how many". Filtered lists
    are counted exactly: their counts are smaller and people act on them.
    """

    # Below this estimated size an exact count is cheap enough.
    estimate_above = 50_000

    count_is_estimate = False

    @cached_property
    def count(self) -> int:
        estimate = self.estimated_count()
        if estimate is not None:
            self.count_is_estimate = True
            return estimate
        exact: int = super().count
        return exact

    def estimated_count(self) -> int | None:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return None
        query = queryset.query
        if query.has_filters() or query.distinct or query.is_sliced:
            return None
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            return None
        table = connection.ops.quote_name(queryset.model._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", [table]
            )
            row = cursor.fetchone()
        # reltuples is -1 (or 0) for a table never analyzed: then count for real.
        if row is None or row[0] is None or row[0] < self.estimate_above:
            return None
        return int(row[0])


class JobChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, *args: Any, **kwargs: Any) -> QuerySet[Any]:
        queryset = super().get_queryset(request, *args, **kwargs).defer(*LIST_DEFERRED)
        return queryset.annotate(error_head=ERROR_HEAD)
