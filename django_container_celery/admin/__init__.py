"""The operator's console: the Django admin of container jobs, executor hosts and lanes.

One module per part: ``jobs`` (the job admin and a job's page), ``job_list`` (columns and
search), ``job_actions`` (bulk actions), ``job_views`` (dashboard, logs, row buttons),
``operations`` (what the actions and buttons do), ``filters``, ``paginator``, ``forms``,
``dashboard`` (the figures it reads), ``hosts`` (the executor host admin) and ``lanes``
(the lane admin, with its pause and resume actions).
"""

from __future__ import annotations

from .hosts import ExecutorHostAdmin, ask_hosts, ping_hosts
from .jobs import ContainerJobAdmin
from .lanes import LaneAdmin
from .paginator import EstimatedCountPaginator
from .search import parse_job_id

__all__ = [
    "ContainerJobAdmin",
    "EstimatedCountPaginator",
    "ExecutorHostAdmin",
    "LaneAdmin",
    "ask_hosts",
    "parse_job_id",
    "ping_hosts",
]
