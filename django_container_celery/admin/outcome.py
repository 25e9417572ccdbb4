"""How a job stands, as the list and the job's page show it: which error and exit code are
its current state, and which belong to an attempt that was followed by another.

A job that failed once and then completed keeps the first attempt's ``last_error`` (and a
job that waited keeps ``scheduled_for``): both are history once a later attempt ran, and
are shown as such, never as the job's present.
"""

from __future__ import annotations

from django.db.models.functions import Substr
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .. import states
from ..masking import MASK, MIN_MASKED_LENGTH, mask_text, secret_values
from ..models import ContainerJob, JobAttempt
from ..states import Status
from .common import when

# An error is the job's present only in these statuses; in any other it is an earlier
# attempt's (a job retried by hand waits with its old error, a later attempt may run). A
# cancel writes no error, so a cancelled job's error is an earlier attempt's too.
ERROR_IS_CURRENT = frozenset({Status.FAILED, Status.RETRYING})
# An exit code is the job's present once its last attempt ended.
EXIT_IS_CURRENT = frozenset({Status.COMPLETED, Status.FAILED, Status.RETRYING})

# The list reads this much of each error instead of the whole column, masks it, then
# shortens it: a secret cut by the read lies past what is shown, so it is never half shown.
ERROR_HEAD_CHARS = 1000
ERROR_HEAD = Substr("last_error", 1, ERROR_HEAD_CHARS)


def masked_error(job: ContainerJob, text: str | None = None) -> str:
    """The job's error (or ``text``, its head) with its secrets masked."""
    if text is None:
        return mask_text(job.last_error, job.environment)
    masked = mask_text(text, job.environment)
    if len(text) < ERROR_HEAD_CHARS:
        return masked
    # A head cut inside a secret ends with the secret's beginning, which masking whole
    # values cannot find.
    for secret in secret_values(job.environment):
        for length in range(len(secret) - 1, MIN_MASKED_LENGTH - 1, -1):
            if masked.endswith(secret[:length]):
                return masked[:-length] + MASK
    return masked


def current_error(job: ContainerJob, text: str | None = None) -> str:
    """The error that is the job's present state, masked; empty when there is none."""
    if job.status not in ERROR_IS_CURRENT:
        return ""
    return masked_error(job, text)


def earlier_error(job: ContainerJob) -> str:
    """An error left by an attempt that was followed by another, masked; else empty."""
    if job.status in ERROR_IS_CURRENT or not job.last_error:
        return ""
    return masked_error(job)


def current_exit_code(job: ContainerJob) -> int | None:
    return job.exit_code if job.status in EXIT_IS_CURRENT else None


def schedule_is_current(job: ContainerJob) -> bool:
    """A due time means something only while the job waits for it."""
    return job.status in states.WAITING or job.status == Status.PENDING


# A job's page lists at most this many attempts, the latest ones.
ATTEMPTS_SHOWN = 20


def attempt_rows(job: ContainerJob) -> list[JobAttempt]:
    """The job's latest ended attempts, oldest first; none asked for a job never launched.

    Kept on the job: Django asks for a page's fieldsets several times per request.
    """
    kept: list[JobAttempt] | None = getattr(job, "_dcc_attempts", None)
    if kept is not None:
        return kept
    if not job.attempt:
        return []
    latest = job.attempts.select_related("host").order_by("-attempt", "-id")[:ATTEMPTS_SHOWN]
    rows = list(reversed(latest))
    job._dcc_attempts = rows  # type: ignore[attr-defined]
    return rows


def attention_note(job: ContainerJob) -> SafeString:
    """Why a job needs attention and what to do, for the top of its page."""
    if not job.needs_attention:
        return format_html("{}", "-")
    count = job.attempts_without_outcome
    head = (
        ngettext(
            "Failed after %(count)d attempt that ended without an outcome",
            "Failed after %(count)d attempts that ended without an outcome",
            count,
        )
        % {"count": count}
        if count
        else str(_("Failed after attempts that ended without an outcome"))
    )
    return format_html(
        '<p class="errornote dcc-attention">{}: {} {}</p>',
        head,
        _(
            "its container vanished (removed, lost with its host, or never started), or "
            "finishing it kept failing. It is not retried automatically, whatever retries "
            "it has left."
        ),
        _(
            "Look at the host and the error of each attempt below and at the health of "
            "those hosts (Executor hosts), fix the cause, then use Retry, which clears "
            "this mark."
        ),
    )


def _memory(row: JobAttempt) -> str:
    return "-" if row.memory_limit is None else f"{row.memory_limit} MiB"


def attempt_table(job: ContainerJob, rows: list[JobAttempt]) -> SafeString:
    def ending(row: JobAttempt) -> str:
        text = row.get_reason_display()
        if row.exit_code is not None:
            text += f" ({row.exit_code})"
        return text + (" → " + str(_("retried")) if row.retried else "")

    def run_time(row: JobAttempt) -> str:
        took = row.run_time
        return "-" if took is None else f"{took.total_seconds():.1f} s"

    body = format_html_join(
        "",
        '<tr class="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
        '<td class="dcc-attempt-error">{}</td></tr>',
        (
            (
                "dcc-attempt-ok" if row.succeeded else "dcc-attempt-bad",
                row.attempt,
                ending(row),
                row.host.name if row.host else "-",
                _memory(row),
                when(row.ended_at),
                run_time(row),
                mask_text(row.error, job.environment),
            )
            for row in rows
        ),
    )
    return format_html(
        '<table class="dcc-attempts"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th>'
        "<th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>{}</tbody></table>",
        _("Attempt"),
        _("Ended"),
        _("Host"),
        _("Memory"),
        _("At"),
        _("Ran for"),
        _("Error"),
        body,
    )
