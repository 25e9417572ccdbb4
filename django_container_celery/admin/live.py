"""A running job's output while it runs: the tail of its container's streams, read from
the daemon on request.

The change page of a launching or running job shows :func:`live_panel`; its script
(``static/django_container_celery/live_log.js``) asks :func:`live_tail_response` for the
tails every :data:`POLL_INTERVAL_MS` and puts them in the panel's boxes as text. Once the
job is no longer active the answer holds its stored logs and ``running: false``, and the
script stops asking.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

from .. import states
from ..exceptions import ExecutorError
from ..executors import executor_for
from ..executors.base import CUT_MARKER_RE
from ..masking import MASK, MIN_MASKED_LENGTH, mask_text, secret_values
from ..models import ContainerJob
from ..states import Status

# Bytes of each stream one answer carries. A page polls every couple of seconds for as long
# as it is open, so each answer must stay cheap for the daemon, the web process and the
# browser, whatever the container prints; 64 KiB is several screenfuls of a log box, and
# what the stored log keeps by default (LOG_MAX_BYTES).
LIVE_TAIL_BYTES = 64 * 1024
# Seconds a read may wait on the daemon. A person is waiting, and the next poll comes in a
# few seconds anyway: a daemon that does not answer by then is reported as such instead of
# holding a web worker for the Docker client's usual minute.
LIVE_READ_TIMEOUT = 3.0
# Milliseconds between two reads by an open page.
POLL_INTERVAL_MS = 2000

# What an answer puts in front of a tail that leaves earlier output out, in place of the
# readers' own lines (CUT_MARKER_RE): a live read may see only the recent end of the log,
# and the answer cuts again after masking, so no exact count of what is left out is known.
EARLIER_OUTPUT = "[... earlier output not shown ...]\n"

STREAMS = ("stdout", "stderr")


def live_panel(job: ContainerJob, tail_url: str) -> SafeString:
    """The change page's live output box; the page's script fills it from ``tail_url``."""
    limit = f"{LIVE_TAIL_BYTES // 1024} KiB"
    first_state = (
        _("Waiting for the container to start…")
        if job.status == Status.LAUNCHING
        else _("Reading the output…")
    )
    return format_html(
        '<div class="dcc-live" data-tail-url="{url}" data-interval="{interval}">'
        '<p class="dcc-live-status">'
        # Only this part is announced to screen readers, and it changes only when the state
        # does; the time of the last read beside it changes at every poll.
        '<span class="dcc-live-state" role="status" aria-live="polite">{state}</span> '
        '<span class="dcc-live-updated"></span></p>'
        "{stdout}{stderr}"
        '<p class="dcc-muted">{help}</p>'
        '<noscript><p class="dcc-muted">{noscript}</p></noscript>'
        "</div>",
        url=tail_url,
        interval=POLL_INTERVAL_MS,
        state=first_state,
        stdout=_stream_box(job, "stdout"),
        stderr=_stream_box(job, "stderr"),
        help=_(
            "The latest output of each stream (up to %(limit)s), read from the Docker "
            "daemon every %(seconds)s seconds while the job runs; secret values are masked."
        )
        % {"limit": limit, "seconds": f"{POLL_INTERVAL_MS / 1000:g}"},
        noscript=_("Live output needs JavaScript; the stored logs are shown once the job ends."),
    )


def _stream_box(job: ContainerJob, stream: str) -> SafeString:
    label_id = f"dcc-live-{stream}-label"
    # Focusable, so the box scrolls with the keyboard.
    return format_html(
        '<div class="dcc-live-stream"><div class="dcc-live-label" id="{}">{}</div>'
        '<pre class="dcc-live-log" data-stream="{}" tabindex="0" aria-labelledby="{}">'
        "</pre></div>",
        label_id,
        stream,
        stream,
        label_id,
    )


def live_tail_response(job: ContainerJob) -> HttpResponse:
    """The current tail of the job's container output, as JSON.

    ``{"status", "running", "source", "stdout", "stderr", "truncated": {"stdout",
    "stderr"}, "error", "max_bytes", "read_at"}``: read from the daemon (``source``
    ``"daemon"``) while the job is launching or running, else its stored logs
    (``"stored"``) with ``running`` false. A daemon that fails gives ``error`` (and empty
    streams) with ``running`` still true: the page says so and keeps asking.
    """
    response = JsonResponse(live_tail(job))
    response["Cache-Control"] = "no-store"
    return response


def live_tail(job: ContainerJob) -> dict[str, Any]:
    """What :func:`live_tail_response` answers, as a dict."""
    if job.status in states.ACTIVE:
        executor = executor_for(job.assigned_host or job.docker_host)
        try:
            stdout, stderr = executor.recent_logs(
                job.container_name, LIVE_TAIL_BYTES, LIVE_READ_TIMEOUT
            )
        except ExecutorError as exc:
            return _answer(job, "daemon", "", "", error=str(exc))
        # The job may have ended while the daemon was read, and its container been removed
        # (read as empty): then its stored logs are the answer.
        current = ContainerJob.objects.filter(pk=job.pk).first()
        if current is not None and current.status in states.ACTIVE:
            return _answer(job, "daemon", stdout, stderr)
        job = current if current is not None else job
    return _answer(job, "stored", job.stdout_log or "", job.stderr_log or "")


def _answer(
    job: ContainerJob, source: str, stdout: str, stderr: str, error: str = ""
) -> dict[str, Any]:
    environment = job.environment or {}
    shown = {"stdout": _shown(stdout, environment), "stderr": _shown(stderr, environment)}
    return {
        "status": job.status,
        "status_display": job.get_status_display(),
        "running": job.status in states.ACTIVE,
        "source": source,
        "stdout": shown["stdout"][0],
        "stderr": shown["stderr"][0],
        "truncated": {stream: shown[stream][1] for stream in STREAMS},
        "error": mask_text(error, environment),
        "max_bytes": LIVE_TAIL_BYTES,
        "read_at": timezone.now().isoformat(),
    }


def _shown(text: str, environment: dict[str, Any]) -> tuple[str, bool]:
    """``text`` masked and cut to its last :data:`LIVE_TAIL_BYTES` bytes, behind
    :data:`EARLIER_OUTPUT` when anything before it is left out; and whether it was cut."""
    marker = CUT_MARKER_RE.match(text)
    cut = marker is not None
    body = mask_text(text[marker.end() :] if marker else text, environment)
    if cut:
        body = _mask_cut_secret(body, secret_values(environment))
    encoded = body.encode("utf-8")
    if len(encoded) > LIVE_TAIL_BYTES:
        # Masking can lengthen a text (a short secret becomes the longer mask), and a
        # stored log may have been kept longer than this. Cut after masking, so the cut
        # splits a mask at worst, never a secret. A character split by the cut is dropped.
        body = encoded[-LIVE_TAIL_BYTES:].decode("utf-8", "ignore")
        cut = True
    return (EARLIER_OUTPUT + body if cut else body), cut


def _mask_cut_secret(body: str, secrets: list[str]) -> str:
    """A tail cut in the middle of a secret opens with the secret's end, which masking
    whole values cannot find: mask that end too (when it is long enough to be masked)."""
    for secret in secrets:  # longest first
        for length in range(len(secret) - 1, MIN_MASKED_LENGTH - 1, -1):
            if body.startswith(secret[-length:]):
                return MASK + body[length:]
    return body
