"""A running job's output while it runs: the tail of its container's streams, read from
the daemon on request."""

from __future__ import annotations

from django.http import HttpResponse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from ..models import ContainerJob


def live_panel(job: ContainerJob, tail_url: str) -> SafeString:
    """The change page's live output box; the page's script fills it from ``tail_url``."""
    return format_html('<div class="dcc-live" data-tail-url="{}"></div>', tail_url)


def live_tail_response(job: ContainerJob) -> HttpResponse:
    """The current tail of the job's container output."""
    return HttpResponse("", content_type="text/plain; charset=utf-8")
