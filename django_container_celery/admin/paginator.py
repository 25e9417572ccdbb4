"""Counting and loading the job list without reading the whole table."""

from __future__ import annotations

import json
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
    """Counts a large list from the planner's statistics, not a scan.

    ``COUNT(*)`` over hundreds of thousands of rows costs a full scan on PostgreSQL, on
    every page load, for a number an operator reads as "about how many". The unfiltered
    table is counted from its statistics; a filtered list or a search is counted exactly
    up to ``exact_up_to`` rows (people act on those counts), and past that it reads
    "about N" with the planner's estimate, so a search matching most jobs stops reading
    after the first ``exact_up_to``.
    """

    # Below this estimated size an exact count is cheap enough.
    estimate_above = 50_000
    exact_up_to = 50_000

    count_is_estimate = False

    @cached_property
    def count(self) -> int:
        estimate = self.estimated_count()
        if estimate is not None:
            self.count_is_estimate = True
            return estimate
        queryset = self.object_list
        if not isinstance(queryset, QuerySet) or connections[queryset.db].vendor != "postgresql":
            exact: int = super().count
            return exact
        capped = queryset.order_by()[: self.exact_up_to + 1].count()
        if capped <= self.exact_up_to:
            return capped
        self.count_is_estimate = True
        return max(capped, planned_rows(queryset))

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


def planned_rows(queryset: QuerySet[Any]) -> int:
    """PostgreSQL's estimate of the rows a query returns, from its plan (no execution)."""
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class JobChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, *args: Any, **kwargs: Any) -> QuerySet[Any]:
        return super().get_queryset(request, *args, **kwargs).defer(*LIST_DEFERRED)

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        # The head of each error is read for the page's rows only, in one more query: as
        # a column of the list's own query it would be computed, and its TOASTed text
        # read, for every row a sorted page sorts, not only for the hundred shown.
        rows = list(self.result_list)
        heads = dict(
            self.model._default_manager.filter(pk__in=[row.pk for row in rows])
            .order_by()
            .annotate(head=ERROR_HEAD)
            .values_list("pk", "head")
        )
        for row in rows:
            row.error_head = heads.get(row.pk, "")
        self.result_list = rows
