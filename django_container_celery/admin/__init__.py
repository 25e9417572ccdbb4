"""The operator's console: the Django admin of container jobs and executor hosts.

One module per part: ``jobs`` (the job admin and a job's page), ``job_list`` (columns and
search), ``job_actions`` (bulk actions), ``job_views`` (dashboard, logs, row buttons),
``operations`` (what the actions and buttons do), ``filters``, ``paginator``, ``forms``,
``dashboard`` (the figures it reads) and ``hosts`` (the executor host admin).
"""

from __future__ import annotations

from .hosts import ExecutorHostAdmin, ask_hosts, ping_hosts
from .jobs import ContainerJobAdmin
from .paginator import EstimatedCountPaginator
from .search import parse_job_id

__all__ = [
    "ContainerJobAdmin",
    "EstimatedCountPaginator",
    "ExecutorHostAdmin",
    "ask_hosts",
    "parse_job_id",
    "ping_hosts",
]
